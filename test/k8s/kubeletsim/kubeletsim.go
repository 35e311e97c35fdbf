// Package kubeletsim does the kubelet's part of the API for tests and the lab, where no
// kubelet runs: it registers Nodes with addresses and Ready status, creates Pods bound to a
// node (there is no scheduler) and reports their IP and readiness through the status
// subresource, as a kubelet would once the CNI has given the pod an address.
package kubeletsim

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// EnsureNode registers a Ready Node with an internal IP, if it does not exist yet.
func EnsureNode(ctx context.Context, c kubernetes.Interface, name, internalIP string) (*corev1.Node, error) {
	n, err := c.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return n, nil
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get node %s: %w", name, err)
	}
	n, err = c.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name,
		Labels: map[string]string{corev1.LabelHostname: name}}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create node %s: %w", name, err)
	}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: internalIP},
		{Type: corev1.NodeHostName, Address: name}}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue,
		LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(), Reason: "KubeletReady"}}
	n, err = c.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("set status of node %s: %w", name, err)
	}
	return n, nil
}

// PodSpec is what a test pod needs.
type PodSpec struct {
	Namespace, Name, Node string
	Labels                map[string]string
	Ports                 []corev1.ContainerPort
	Annotations           map[string]string
	OwnerReferences       []metav1.OwnerReference // e.g. the StatefulSet of a StatefulSet-style pod
}

// CreatePod creates a Pod bound to its node, not yet running.
func CreatePod(ctx context.Context, c kubernetes.Interface, s PodSpec) (*corev1.Pod, error) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, Labels: s.Labels, Annotations: s.Annotations,
			OwnerReferences: s.OwnerReferences},
		Spec: corev1.PodSpec{NodeName: s.Node, Containers: []corev1.Container{{Name: "app", Image: "tern.invalid/app",
			Ports: s.Ports}}},
	}
	p, err := c.CoreV1().Pods(s.Namespace).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", s.Namespace, s.Name, err)
	}
	return p, nil
}

// SetRunning reports the pod running with ip, Ready or not, through the status subresource.
func SetRunning(ctx context.Context, c kubernetes.Interface, p *corev1.Pod, ip string, ready bool) (*corev1.Pod, error) {
	cur, err := c.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	now := metav1.Now()
	cur.Status.Phase = corev1.PodRunning
	cur.Status.PodIP = ip
	cur.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	cur.Status.StartTime = &now
	cur.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodReady, Status: status, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: status, LastTransitionTime: now},
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
	}
	out, err := c.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("report status of pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	return out, nil
}

// RunPod creates a pod and reports it running and Ready with ip.
func RunPod(ctx context.Context, c kubernetes.Interface, s PodSpec, ip string) (*corev1.Pod, error) {
	p, err := CreatePod(ctx, c, s)
	if err != nil {
		return nil, err
	}
	return SetRunning(ctx, c, p, ip, true)
}

// DeletePod removes a pod at once (a kubelet would have stopped its containers).
func DeletePod(ctx context.Context, c kubernetes.Interface, namespace, name string) error {
	zero := int64(0)
	err := c.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete pod %s/%s: %w", namespace, name, err)
	}
	return nil
}
