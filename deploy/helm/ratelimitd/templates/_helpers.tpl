{{- define "ratelimitd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ratelimitd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ratelimitd.labels" -}}
{{ include "ratelimitd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The chart's own Secret: only when a value puts a secret in it. */}}
{{- define "ratelimitd.ownSecret" -}}
{{- if or .Values.storage.url .Values.operatorToken.value -}}true{{- end -}}
{{- end -}}

{{- define "ratelimitd.embedded" -}}
{{- if not (or .Values.storage.url .Values.storage.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* A value as TOML: a map as an inline table, anything else as JSON (a JSON string, number,
     boolean or array of strings is the same in TOML). */}}
{{- define "ratelimitd.tomlValue" -}}
{{- if kindIs "map" . -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s = %s" $k (toJson $v)) -}}
{{- end -}}
{ {{ join ", " $pairs }} }
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* The settings file: what the values above set, then .Values.config. */}}
{{- define "ratelimitd.toml" -}}
{{- range list "listen" "metrics_listen" "data_dir" "redis_url" "operator_token" "tls_cert" "tls_key" "tls_client_ca" "redis_tls_ca" "redis_tls_cert" "redis_tls_key" -}}
{{- if hasKey $.Values.config . -}}
{{- fail (printf "config.%s: set it through the chart's own values (port, metrics, storage, operatorToken, tls), not config" .) -}}
{{- end -}}
{{- end -}}
# ratelimitd.toml from the Helm chart; `ratelimitd config show` prints what is in effect.
listen = "0.0.0.0:{{ .Values.port }}"
metrics_listen = {{ if .Values.metrics.enabled }}"0.0.0.0:{{ .Values.metrics.port }}"{{ else }}""{{ end }}
data_dir = "/data"
{{- if .Values.tls.secretName }}
tls_cert = "/etc/ratelimitd/tls/tls.crt"
tls_key = "/etc/ratelimitd/tls/tls.key"
{{- if .Values.tls.clientCA }}
tls_client_ca = "/etc/ratelimitd/tls/ca.crt"
{{- end }}
{{- end }}
{{- if .Values.storage.tlsSecret }}
redis_tls_ca = "/etc/ratelimitd/storage-tls/ca.crt"
{{- end }}
{{- range $key, $value := .Values.config }}
{{ $key }} = {{ include "ratelimitd.tomlValue" $value }}
{{- end }}
{{- end -}}
