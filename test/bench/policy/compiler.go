package main

import (
	"fmt"
	"io"
	"slices"
	"syscall"
	"time"

	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/policy"
	"github.com/tern-net/tern/policy/policymap"
	"github.com/tern-net/tern/policy/policytest"
)

// compilerResult is the compiler part of the report.
type compilerResult struct {
	pods, policies, identities, rules, cidrs int
	compileWall, compileCPU                  time.Duration // medians of 3
	mapMem                                   uint64        // the three policy maps holding every identity's rules
	firstWrite                               time.Duration
	churn                                    []churnRun
}

// churnRun is one identity change: one pod's labels, compiled (whole, for comparison, and
// incrementally, as the agent does), encoded and written.
type churnRun struct {
	whole, incremental, write time.Duration
	encode                    time.Duration // a whole encode and diff, for comparison
	recompiled                int           // policies the incremental compiler recompiled
	written                   int           // entries written or deleted
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func measureCompiler(churn int) (*compilerResult, error) {
	st := policytest.BigState()
	r := &compilerResult{pods: len(st.Pods), policies: len(st.Policies)}
	var walls, cpus []time.Duration
	var d *policy.Desired
	for range 3 {
		c0, t0 := cpuTime(), time.Now()
		var err error
		if d, err = policy.Compile(st); err != nil {
			return nil, err
		}
		walls, cpus = append(walls, time.Since(t0)), append(cpus, cpuTime()-c0)
	}
	slices.Sort(walls)
	slices.Sort(cpus)
	r.compileWall, r.compileCPU = walls[1], cpus[1]
	r.identities, r.rules, r.cidrs = len(d.Shapes), len(d.Rules), len(d.CIDRs)

	// Every identity's rules in one node's maps: the worst case (a node hosting every app).
	dp, err := loader.LoadPrivate()
	if err != nil {
		return nil, err
	}
	defer dp.Close()
	pm := dp.PolicyMaps()
	w, err := policymap.NewWriter(pm)
	if err != nil {
		return nil, err
	}
	// The agent's path: the incremental compiler fed the whole state, one full write.
	c, d, err := policy.CompileIncremental(st)
	if err != nil {
		return nil, err
	}
	c.TakeTouched() // the full write below holds them
	t0 := time.Now()
	if _, err := w.Sync(policymap.Encode(d, policymap.Options{})); err != nil {
		return nil, err
	}
	r.firstWrite = time.Since(t0)
	r.mapMem = mapBytes(pm.Rules, pm.Isolation, pm.CIDRs)
	for i := range churn {
		// Pod i*7 gets a label no other pod has: a new identity, whose rules (it keeps its
		// app label, so the same policies select it) are added, and the peers' rules that
		// name it.
		p := &st.Pods[(i*7)%len(st.Pods)]
		p.Labels["churn"] = fmt.Sprint(i)
		var run churnRun
		t0 := time.Now()
		if _, err := policy.Compile(st); err != nil {
			return nil, err
		}
		run.whole = time.Since(t0)
		t0 = time.Now()
		c.SetPod(p)
		d, err := c.Desired()
		if err != nil {
			return nil, err
		}
		run.incremental, run.recompiled = time.Since(t0), c.Recompiled()
		// What the agent does after its first sync: rewrite only the touched identities.
		t0 = time.Now()
		s, err := w.SyncSubjects(d, c.RulesOf, c.TakeTouched(), policymap.Options{})
		if err != nil {
			return nil, err
		}
		run.write, run.written = time.Since(t0), s.Written+s.Deleted
		// For comparison, what a whole encode and diff of the maps costs (the first sync's
		// path); it finds nothing left to write.
		t0 = time.Now()
		full, err := w.Sync(policymap.Encode(d, policymap.Options{}))
		if err != nil {
			return nil, err
		}
		run.encode = time.Since(t0)
		if full.Written+full.Deleted != 0 {
			return nil, fmt.Errorf("churn %d: a whole sync after the incremental one wrote %d entries: the incremental write missed them", i, full.Written+full.Deleted)
		}
		r.churn = append(r.churn, run)
	}
	return r, nil
}

func durMedian(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func (r *compilerResult) report(w io.Writer) {
	fmt.Fprintf(w, "Compiler, %d policies over %d pods: %d identities, %d rule entries, %d ipBlock prefixes; a whole compile takes %s of CPU (%s wall), median of 3. Written into empty maps in %s; the three policy maps then hold %s of kernel memory (every identity's rules: a node hosting every app).\n\n",
		r.policies, r.pods, r.identities, r.rules, r.cidrs, r.compileCPU.Round(time.Millisecond), r.compileWall.Round(time.Millisecond),
		r.firstWrite.Round(time.Millisecond), mib(r.mapMem))
	var whole, inc, enc, write []time.Duration
	var n, rc []int
	for _, c := range r.churn {
		whole, inc, enc, write = append(whole, c.whole), append(inc, c.incremental), append(enc, c.encode), append(write, c.write)
		n, rc = append(n, c.written), append(rc, c.recompiled)
	}
	slices.Sort(n)
	slices.Sort(rc)
	fmt.Fprintf(w, "Identity churn, %d changes (one pod's labels each, a new identity), medians: incremental compile %s (%d–%d policies recompiled; a whole compile: %s), write of the touched identities %s (%d–%d entries written per change; a whole encode and diff of the maps instead: %s).\n",
		len(r.churn), durMedian(inc).Round(10*time.Microsecond), rc[0], rc[len(rc)-1], durMedian(whole).Round(time.Millisecond),
		durMedian(write).Round(10*time.Microsecond), n[0], n[len(n)-1], durMedian(enc).Round(time.Millisecond))
}
