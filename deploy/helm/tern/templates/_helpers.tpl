{{- define "tern.labels" -}}
app.kubernetes.io/name: tern-agent
app.kubernetes.io/part-of: tern
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tern.selector" -}}
app.kubernetes.io/name: tern-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tern.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}


{{- /*
tern.compact renders a values map as JSON without its "" and null leaves, recursively: in
agentConfig and eniConf they mean "the agent's default", which is a key left out.
*/ -}}
{{- define "tern.compact" -}}
{{- $out := dict -}}
{{- range $k, $v := . -}}
{{- if kindIs "map" $v -}}
{{- $_ := set $out $k (include "tern.compact" $v | fromJson) -}}
{{- else if not (or (kindIs "invalid" $v) (and (kindIs "string" $v) (eq $v ""))) -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- /*
tern.agentConfig is agent.json: agentConfig compacted, with the chart's two adjustments
(values.yaml): no ENI options with ipam.mode none, and the host's cgroup2 mount for socketLB.
*/ -}}
{{- define "tern.agentConfig" -}}
{{- $cfg := include "tern.compact" .Values.agentConfig | fromJson -}}
{{- if eq (dig "ipam" "mode" "" $cfg) "none" -}}
{{- range list "clusterID" "eniConfigPath" "statePath" "instanceID" "regionID" "cloudEndpoint" "cloud" "eniConfigPollInterval" "allocateWait" "maintainInterval" "eniLinkTimeout" "listingGrace" "cniConfDir" -}}
{{- $_ := unset $cfg . -}}
{{- end -}}
{{- end -}}
{{- if and (dig "socketLB" "enabled" false $cfg) (not (dig "socketLB" "cgroup" "" $cfg)) -}}
{{- $_ := set $cfg.socketLB "cgroup" "/run/tern/cgroupv2" -}}
{{- end -}}
{{- toPrettyJson $cfg -}}
{{- end -}}
