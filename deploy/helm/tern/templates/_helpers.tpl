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
