//go:build linux

package lab_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tern-net/tern/bandwidth"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/test/lab"
)

// TestBandwidthAnnotationsReachTheDatapath drives a pod's bandwidth annotations through the
// real apiserver and a real agent: set on a running pod, the limit appears in the node's
// tern_bandwidth map; a bad value gives the pod a Warning Event, is counted, and leaves the
// pod unlimited but running; a new value replaces it; removing the annotations removes the
// limit. The agent reports its mode (policer on this kernel: no fq) in /v1/state and
// /metrics.
func TestBandwidthAnnotationsReachTheDatapath(t *testing.T) {
	l := upKubernetes(t, lab.Options{Nodes: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	n := l.Node(0)
	if _, err := l.RunPod(ctx, lab.PodSpec{Namespace: "default", Name: "limited", Node: n.Name}); err != nil {
		t.Fatal(err)
	}
	st, err := n.Client().State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fq, err := bandwidth.ProbeFQ()
	if err != nil {
		t.Fatal(err)
	}
	wantMode := map[bool]string{true: "edt", false: "policer"}[fq]
	if st.BandwidthMode != wantMode {
		t.Fatalf("/v1/state bandwidthMode %q, want %q (kernel has fq: %v)", st.BandwidthMode, wantMode, fq)
	}
	maps, err := loader.OpenPinnedMaps(n.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer maps.Close()

	annotate := func(ann map[string]any) {
		t.Helper()
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
		if _, err := l.Client().CoreV1().Pods("default").Patch(ctx, "limited", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// waitMap waits until the node's map holds exactly want (rates in bytes/s by direction;
	// nil: no entry).
	waitMap := func(what string, want *loader.BWValue) {
		t.Helper()
		var got map[loader.BWKey]loader.BWValue
		for deadline := time.Now().Add(10 * time.Second); ; {
			got, err = maps.DumpBandwidth()
			if err != nil {
				t.Fatal(err)
			}
			ok := len(got) == 0 && want == nil
			for _, v := range got {
				ok = len(got) == 1 && want != nil && v.Egress.Rate == want.Egress.Rate && v.Ingress.Rate == want.Ingress.Rate
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: bandwidth map %+v after 10 s, want %+v", what, got, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	annotate(map[string]any{bandwidth.EgressAnnotation: "10M"})
	waitMap("egress 10M set on a running pod", &loader.BWValue{Egress: loader.BWDir{Rate: 1_250_000}})

	annotate(map[string]any{bandwidth.EgressAnnotation: "10 Mbit"})
	waitMap("a bad egress value", nil)
	var ev *corev1.Event
	for deadline := time.Now().Add(10 * time.Second); ev == nil; {
		evs, err := l.Client().CoreV1().Events("default").List(ctx, metav1.ListOptions{
			FieldSelector: fmt.Sprintf("involvedObject.name=%s,reason=TernBandwidthInvalid", "limited")})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) > 0 {
			ev = &evs.Items[0]
		} else if time.Now().After(deadline) {
			t.Fatal("no TernBandwidthInvalid Event on the pod 10 s after a bad annotation")
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if ev.Type != corev1.EventTypeWarning || ev.Count > 1 {
		t.Fatalf("Event %s type %s count %d, want one Warning", ev.Message, ev.Type, ev.Count)
	}
	t.Logf("Event on the pod: %s", ev.Message)
	metrics, err := n.Client().Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !containsLine(metrics, "tern_bandwidth_invalid_annotations_total 1") ||
		!containsLine(metrics, fmt.Sprintf(`tern_bandwidth_mode{mode="%s"} 1`, wantMode)) {
		t.Fatalf("metrics lack the invalid annotation count or the mode:\n%s", grepLines(metrics, "tern_bandwidth"))
	}

	annotate(map[string]any{bandwidth.EgressAnnotation: nil, bandwidth.IngressAnnotation: "100M"})
	waitMap("ingress 100M replacing the bad egress value", &loader.BWValue{Ingress: loader.BWDir{Rate: 12_500_000}})
	annotate(map[string]any{bandwidth.IngressAnnotation: nil})
	waitMap("annotations removed", nil)
}

func containsLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
