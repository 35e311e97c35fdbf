package main

import (
	"context"
	"math"
	"slices"
	"time"
)

// observer detects when the agent under test holds a change. expect is called before the
// write, so the observer is ready however fast the agent is; forget undoes it when the
// write failed; pending counts changes not seen yet; close stops observing (after close,
// the changes' seen fields are final and safe to read).
type observer interface {
	expect(ch *change)
	forget(ch *change)
	pending() int
	close()
}

// measure makes n changes at random (Poisson) times averaging rate per second, then
// waits up to drain for the agent to catch up. Changes are not waited for one by one: the
// agent sees an independent stream of writes, as it would in a cluster, rather than one
// that pauses politely for it.
func measure(ctx context.Context, cl *cluster, obs observer, n int, rate float64, drain time.Duration) ([]*change, error) {
	defer obs.close()
	var all []*change
	next := time.Now()
	for range n {
		if err := sleepUntil(ctx, next); err != nil {
			return all, err
		}
		ch := cl.prepare()
		obs.expect(ch)
		if err := cl.write(ctx, ch); err != nil {
			obs.forget(ch)
			return all, err
		}
		all = append(all, ch)
		gap := time.Duration(cl.rng.ExpFloat64() / rate * float64(time.Second))
		// A stalled write must not be followed by a burst that makes up for it: bursts
		// measure the agent's queueing, not its latency.
		next = maxTime(next.Add(gap), time.Now())
	}
	deadline := time.Now().Add(drain)
	for obs.pending() > 0 && time.Now().Before(deadline) {
		if err := sleepUntil(ctx, time.Now().Add(10*time.Millisecond)); err != nil {
			return all, err
		}
	}
	return all, nil
}

func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// stats summarises the latencies of the changes that were seen.
type stats struct {
	n, seen              int
	p50, p90, p99, max   time.Duration
	agentP50, agentP99   time.Duration // from the agent's own report, when it has one
	agentN               int
	writeP50, writeP99   time.Duration // the Update round trip: a floor for every agent
	firstWrite, lastSeen time.Time
}

func summarize(chs []*change) stats {
	s := stats{n: len(chs)}
	var lat, agent, write []time.Duration
	for _, ch := range chs {
		if !ch.acked.IsZero() {
			write = append(write, ch.acked.Sub(ch.written))
		}
		if !ch.seen.IsZero() {
			lat = append(lat, ch.latency())
			s.lastSeen = maxTime(s.lastSeen, ch.seen)
		}
		if ch.agentSays > 0 {
			agent = append(agent, ch.agentSays)
		}
	}
	if len(chs) > 0 {
		s.firstWrite = chs[0].written
	}
	s.seen, s.agentN = len(lat), len(agent)
	slices.Sort(lat)
	slices.Sort(agent)
	s.p50, s.p90, s.p99 = quantile(lat, 0.50), quantile(lat, 0.90), quantile(lat, 0.99)
	if len(lat) > 0 {
		s.max = lat[len(lat)-1]
	}
	s.agentP50, s.agentP99 = quantile(agent, 0.50), quantile(agent, 0.99)
	slices.Sort(write)
	s.writeP50, s.writeP99 = quantile(write, 0.50), quantile(write, 0.99)
	return s
}

// quantile is the nearest-rank quantile of sorted values (0 when empty).
func quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
