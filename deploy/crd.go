// Package deploy carries what the code needs of the deployment manifests: the FixedIP
// CustomResourceDefinition, so the lab and tests install exactly the file operators apply.
package deploy

import _ "embed"

// FixedIPCRD is deploy/manifests/05-fixedip-crd.yaml.
//
//go:embed manifests/05-fixedip-crd.yaml
var FixedIPCRD []byte
