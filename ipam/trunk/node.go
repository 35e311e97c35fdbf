package trunk

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Node annotations Terway's daemon sets on a trunking node, which its controllers read.
const (
	AnnotationTrunkOn      = "k8s.aliyun.com/trunk-on"          // the trunk ENI's ID
	AnnotationMaxMemberENI = "k8s.aliyun.com/max-member-eni-ip" // the member quota
)

// PublishNode puts the node's trunking on its Node: capacity and allocatable of
// ResourceMemberENI (what a trunk pod requests, so the scheduler never places more trunk pods
// than the node has member ENIs), and Terway's two annotations. A quota of 0 (trunking off)
// publishes 0, which keeps trunk pods away.
func PublishNode(ctx context.Context, client kubernetes.Interface, node, trunkID string, quota int) error {
	q := resource.NewQuantity(int64(quota), resource.DecimalSI).String()
	status, err := json.Marshal(map[string]any{"status": map[string]any{
		"capacity":    map[string]string{ResourceMemberENI: q},
		"allocatable": map[string]string{ResourceMemberENI: q},
	}})
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		return fmt.Errorf("publish %s=%s on Node %s: %w", ResourceMemberENI, q, node, err)
	}
	return AnnotateNode(ctx, client, node, trunkID, quota)
}

// AnnotateNode puts Terway's two trunking annotations on the Node: the agent's node report
// publishes the aliyun/member-eni capacity with the other kinds' extended resources (the
// agent's role may update nodes/status, not patch it), and calls this for the annotations.
func AnnotateNode(ctx context.Context, client kubernetes.Interface, node, trunkID string, quota int) error {
	ann := map[string]any{AnnotationMaxMemberENI: strconv.Itoa(quota), AnnotationTrunkOn: trunkID}
	if trunkID == "" {
		ann[AnnotationTrunkOn] = nil // merge patch: remove
	}
	meta, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, meta, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("annotate Node %s with its trunk ENI %q: %w", node, trunkID, err)
	}
	return nil
}
