package controller

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// TestTrimForCacheKeepsWhatTheControllerReads: managedFields and kubectl's copy go; the
// labels naming a slice's Service and the annotations choosing a Service's algorithm stay.
func TestTrimForCacheKeepsWhatTheControllerReads(t *testing.T) {
	mf := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "a", ManagedFields: mf,
		Annotations: map[string]string{corev1.LastAppliedConfigAnnotation: "{...}", "service.cilium.io/lb-algorithm": "maglev"}}}
	slice := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: "a-1", ManagedFields: mf,
		Labels: map[string]string{discoveryv1.LabelServiceName: "a"}}}
	for _, obj := range []any{svc, slice} {
		if _, err := trimForCache(obj); err != nil {
			t.Fatal(err)
		}
	}
	if svc.ManagedFields != nil || slice.ManagedFields != nil {
		t.Error("managedFields kept")
	}
	if _, ok := svc.Annotations[corev1.LastAppliedConfigAnnotation]; ok {
		t.Error("last-applied-configuration kept")
	}
	if svc.Annotations["service.cilium.io/lb-algorithm"] != "maglev" || slice.Labels[discoveryv1.LabelServiceName] != "a" {
		t.Errorf("trimmed what the controller reads: %v %v", svc.Annotations, slice.Labels)
	}
	// A tombstone passes untouched.
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/a", Obj: svc}
	if out, err := trimForCache(tomb); err != nil || out != any(tomb) {
		t.Errorf("tombstone: %v, %v", out, err)
	}
}
