// Package etcdput writes Kubernetes objects straight into an apiserver's etcd, encoded as
// the apiserver stores them (protobuf behind the "k8s\x00" prefix, under
// /registry/<resource>/...), through etcd's JSON gateway in transactions of up to 128 puts:
// thousands of objects a second where the API takes tens on a loaded machine. The
// apiserver's watch cache follows etcd, so its clients see the objects as if created
// through the API, but without admission or defaulting: callers build them valid and
// defaulted. The benchmarks that need thousands of Services (svcmem, kubeproxy) use it.
package etcdput

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/protobuf"
	"k8s.io/client-go/kubernetes/scheme"
)

// TxnOps is etcd's default --max-txn-ops: the most puts one transaction may carry.
const TxnOps = 128

// Writer batches puts into etcd transactions. It is not safe for concurrent use.
type Writer struct {
	url   string
	codec runtime.Encoder
	http  *http.Client
	ops   []map[string]any
}

// New returns a Writer for the etcd client URL (http://host:port).
func New(url string) *Writer {
	return &Writer{url: url, codec: protobuf.NewSerializer(scheme.Scheme, scheme.Scheme),
		http: &http.Client{Timeout: time.Minute}}
}

// Put queues obj under key (e.g. /registry/services/specs/NS/NAME) and sends the batch
// once it holds TxnOps puts. Call Flush after the last Put.
func (w *Writer) Put(ctx context.Context, key string, obj runtime.Object) error {
	var buf bytes.Buffer
	if err := w.codec.Encode(obj, &buf); err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	w.ops = append(w.ops, map[string]any{"request_put": map[string]string{
		"key":   base64.StdEncoding.EncodeToString([]byte(key)),
		"value": base64.StdEncoding.EncodeToString(buf.Bytes()),
	}})
	if len(w.ops) == TxnOps {
		return w.Flush(ctx)
	}
	return nil
}

// Flush sends the queued puts as one transaction.
func (w *Writer) Flush(ctx context.Context) error {
	if len(w.ops) == 0 {
		return nil
	}
	body, err := json.Marshal(map[string]any{"success": w.ops})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url+"/v3/kv/txn", bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := w.http.Do(req)
	if err != nil {
		return fmt.Errorf("etcd txn of %d puts: %w", len(w.ops), err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("etcd txn of %d puts: %s: %s", len(w.ops), resp.Status, out)
	}
	var r struct {
		Succeeded bool `json:"succeeded"`
	}
	if err := json.Unmarshal(out, &r); err != nil || !r.Succeeded {
		return fmt.Errorf("etcd txn of %d puts did not succeed: %s", len(w.ops), out)
	}
	w.ops = w.ops[:0]
	return nil
}
