//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tern-net/tern/agent"
	"github.com/tern-net/tern/ipam"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// exclusiveInstanceENIs is ecs.g7.4xlarge's ENI quota, the primary included: the node offers
// one exclusive ENI per other ENI the ENIIP pool does not hold (none here: min_pool_size 0).
const exclusiveInstanceENIs = 8

// exclusiveScenarios: an exclusive-ENI pod has no warm pool (Terway keeps none either: the
// ENI is created for the pod, with its security groups and vSwitch): every ADD creates an ENI,
// attaches it, waits for its link and moves it into the pod, so each is a cold start. The node
// holds at most ENIs − 1 such pods, so a scenario starts that many, not -pods.
func exclusiveScenarios(ctx context.Context, bin, timing string, pods, conc int, latency time.Duration) ([]row, error) {
	n := min(pods, exclusiveInstanceENIs-1)
	tag := "Exclusive ENI, " + timing + " timing"
	o := lab.Options{Nodes: 1, InstanceType: "ecs.g7.4xlarge", BinDir: bin, Timing: timing,
		ENIConf: lab.ENIConf{MinPoolSize: 0, MaxPoolSize: 0},
		AgentConfig: func(_ *lab.Node, c *agent.Config) {
			c.NodeLabels = map[string]string{ipam.LabelExclusiveENI: ipam.LabelExclusiveENIOnly}
		}}
	what := "realistic delays"
	if timing == ecsemu.TimingFast {
		o.Latency = latency
		what = fmt.Sprintf("%v API latency", latency)
	}
	var rows []row
	for _, c := range []int{1, conc} {
		c = min(c, n)
		err := withLab(ctx, o, func(l *lab.Lab) error {
			before := calls(l)
			lat, total, err := burstExclusive(ctx, l, fmt.Sprintf("ex%d", c), n, c)
			if err != nil {
				return err
			}
			k := calls(l) - before
			rows = append(rows, row{fmt.Sprintf("%s (no warm pool: every ADD is cold), %s: %d pods on one node, %d in parallel: total", tag, what, n, c), ms(total)},
				row{"  ADD latency p50 / p99", ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
				row{"  cloud API calls per pod", fmt.Sprintf("%.2f (%d calls)", float64(k)/float64(n), k)})
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("%d in parallel: %w", c, err)
		}
	}
	return rows, nil
}

// burstExclusive adds n pods asking for an exclusive ENI, conc at a time, and returns each
// ADD's latency (retries included) and the wall time of the whole burst.
func burstExclusive(ctx context.Context, l *lab.Lab, prefix string, n, conc int) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			_, errs[i] = l.AddPodAnnotated(ctx, 0, "bench", fmt.Sprintf("%s-%d", prefix, i), map[string]string{ipam.AnnotationENI: "true"})
			lat[i] = time.Since(t0)
		}()
	}
	wg.Wait()
	return lat, time.Since(start), errors.Join(errs...)
}
