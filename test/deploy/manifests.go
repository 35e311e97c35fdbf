// Package deploy proves deploy/manifests against a real apiserver: every object decodes
// strictly and passes a server-side dry run, the agent's configuration in the ConfigMap agrees
// with the DaemonSet's mounts, and the ClusterRole is enough for the real tern-agent (run with
// the ServiceAccount's token) while denying what the agent must not do.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// Object is one document of a manifest file.
type Object struct {
	File  string         // path relative to the manifests directory
	Typed runtime.Object // decoded with client-go's scheme; nil for kinds it lacks (CRDs)
	Raw   *unstructured.Unstructured
}

// String names the object as kubectl would, with its file.
func (o Object) String() string {
	return fmt.Sprintf("%s %s/%s (%s)", o.Raw.GetKind(), o.Raw.GetNamespace(), o.Raw.GetName(), o.File)
}

// Load reads every *.yaml under dir (recursively, in lexical order) and decodes each document.
// Kinds client-go's scheme knows are decoded strictly: an unknown or duplicated field is an
// error, since a misspelt field would otherwise be dropped without a word. Kinds it does not
// know (the ServiceMonitor) come back untyped.
func Load(dir string) ([]Object, error) {
	var files []string
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && filepath.Ext(path) == ".yaml" {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list manifests in %s: %w", dir, err)
	}
	sort.Strings(files)
	strict := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	var out []Object
	for _, path := range files {
		rel, _ := filepath.Rel(dir, path)
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for i := 0; ; i++ {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("%s: document %d: %w", rel, i, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			raw := &unstructured.Unstructured{}
			if err := utilyaml.Unmarshal(doc, &raw.Object); err != nil {
				return nil, fmt.Errorf("%s: document %d: %w", rel, i, err)
			}
			o := Object{File: rel, Raw: raw}
			if scheme.Scheme.Recognizes(raw.GroupVersionKind()) {
				typed, gvk, err := strict.Decode(doc, nil, nil)
				if err != nil {
					return nil, fmt.Errorf("%s: %s %s: %w", rel, raw.GetKind(), raw.GetName(), err)
				}
				typed.GetObjectKind().SetGroupVersionKind(*gvk)
				o.Typed = typed
			}
			out = append(out, o)
		}
	}
	return out, nil
}

func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// Applier creates manifest objects through the dynamic client, finding each kind's resource
// by discovery, as kubectl does.
type Applier struct {
	client dynamic.Interface
	mapper meta.RESTMapper
}

// NewApplier discovers the apiserver's resources once.
func NewApplier(rc *rest.Config) (*Applier, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		return nil, err
	}
	groups, err := restmapper.GetAPIGroupResources(dc)
	if err != nil {
		return nil, fmt.Errorf("discover API resources: %w", err)
	}
	client, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &Applier{client: client, mapper: restmapper.NewDiscoveryRESTMapper(groups)}, nil
}

// Known reports whether the apiserver serves the object's kind (false for an absent CRD).
func (a *Applier) Known(o Object) bool {
	gvk := o.Raw.GroupVersionKind()
	_, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	return err == nil
}

// Create creates the object; with dryRun the apiserver runs admission, defaulting and
// validation (strict field validation either way) and stores nothing.
func (a *Applier) Create(ctx context.Context, o Object, dryRun bool) error {
	gvk := o.Raw.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s: the apiserver does not serve this kind: %w", o, err)
	}
	opts := metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	var ri dynamic.ResourceInterface = a.client.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		ri = a.client.Resource(m.Resource).Namespace(o.Raw.GetNamespace())
	}
	if _, err := ri.Create(ctx, o.Raw.DeepCopy(), opts); err != nil {
		return fmt.Errorf("create %s (dry run %v): %w", o, dryRun, err)
	}
	return nil
}
