package api

import "encoding/json"

// NetworkName is the CNI network tern installs.
const NetworkName = "tern"

// ConflistFile is the name of the installed conflist. containerd takes the first conflist of
// its directory in lexical order; "10-" sorts before the usual "99-loopback" and after "05-".
const ConflistFile = "10-tern.conflist"

// Conflist is the CNI network configuration that points tern-cni at an agent's socket.
func Conflist(socket string) ([]byte, error) {
	return json.MarshalIndent(map[string]any{
		"cniVersion": "1.1.0",
		"name":       NetworkName,
		"plugins": []map[string]any{{
			"type":   "tern-cni",
			"socket": socket,
			"capabilities": map[string]bool{
				"portMappings": true, "bandwidth": true, "io.kubernetes.cri.pod-annotations": true,
			},
		}},
	}, "", "  ")
}
