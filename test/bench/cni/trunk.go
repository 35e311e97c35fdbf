//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tern-net/tern/ipam/trunk"
	"github.com/tern-net/tern/test/ecsemu"
	"github.com/tern-net/tern/test/lab"
)

// trunkScenarios: ENI trunking has no pool of members — every ADD creates a member ENI and
// attaches it to the trunk (two cloud calls and a wait for the VLAN). What can be warm or cold
// is the trunk ENI: "cold" is the agent's start, which creates and attaches it, "warm" every
// ADD after it. The lab's instance type gets a member quota above the pod count.
func trunkScenarios(ctx context.Context, bin, timing string, pods, conc int, latency time.Duration) ([]row, error) {
	var rows []row
	tag := "trunk (member ENIs), " + timing + " timing"
	seq := min(pods, 20)
	// ecs.g7.4xlarge has EniQuantity 8: members for both scenarios' pods.
	o := lab.Options{Nodes: 1, InstanceType: "ecs.g7.4xlarge", BinDir: bin, Timing: timing, DeferAgents: true,
		TrunkENIs: 8 + seq + pods, ENIConf: lab.ENIConf{EnableENITrunking: true, MaxPoolSize: 5}}
	if timing == ecsemu.TimingFast {
		o.Latency = latency
		tag += fmt.Sprintf(", %v API latency", latency)
	}
	err := withLab(ctx, o, func(l *lab.Lab) error {
		t0 := time.Now()
		if err := l.Node(0).StartAgent(ctx); err != nil {
			return err
		}
		start := time.Since(t0)
		startCalls := calls(l)
		lat, _, err := burstMembers(ctx, l, "seq", seq, 1)
		if err != nil {
			return err
		}
		n := calls(l) - startCalls
		rows = append(rows, row{fmt.Sprintf("%s: cold — agent start to ready (trunk ENI created and attached)", tag), ms(start)},
			row{"  cloud API calls of the start", fmt.Sprint(startCalls)},
			row{fmt.Sprintf("  warm (trunk ready): ADD latency, one at a time (%d pods): p50 / p99", seq), ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
			row{"  cloud API calls per pod", fmt.Sprintf("%.2f (%d calls)", float64(n)/float64(seq), n)})
		before := calls(l)
		lat, total, err := burstMembers(ctx, l, "par", pods, conc)
		if err != nil {
			return err
		}
		n = calls(l) - before
		rows = append(rows, row{fmt.Sprintf("  warm: %d pods, %d in parallel: total", pods, conc), ms(total)},
			row{"  ADD latency p50 / p99", ms(pct(lat, 50)) + " / " + ms(pct(lat, 99))},
			row{"  cloud API calls per pod", fmt.Sprintf("%.2f (%d calls)", float64(n)/float64(pods), n)})
		return nil
	})
	return rows, err
}

// burstMembers is burst for pods that ask for a member ENI (k8s.aliyun.com/pod-eni).
func burstMembers(ctx context.Context, l *lab.Lab, prefix string, n, conc int) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	start := time.Now()
	ann := map[string]string{trunk.AnnotationPodENI: "true"}
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			_, errs[i] = l.AddPodAnnotated(ctx, 0, "bench", fmt.Sprintf("trunk-%s-%d", prefix, i), ann)
			lat[i] = time.Since(t0)
		}()
	}
	wg.Wait()
	return lat, time.Since(start), errors.Join(errs...)
}
