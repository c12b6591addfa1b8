{{/* Names, labels and the image, shared by the templates. */}}

{{- define "querywarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "querywarden.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "querywarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "querywarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "querywarden.labels" -}}
{{ include "querywarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "querywarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "querywarden.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "querywarden.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- .Values.image.repository -}}
{{- if $tag }}:{{ $tag }}{{ end -}}
{{- if .Values.image.digest }}@{{ .Values.image.digest }}{{ end -}}
{{- end -}}

{{- define "querywarden.sidecarImage" -}}
{{- default (include "querywarden.image" .) .Values.sidecar.image -}}
{{- end -}}

{{/* Cluster-scoped names carry the release namespace: two releases never collide. */}}
{{- define "querywarden.clusterName" -}}
{{- printf "%s-%s" (include "querywarden.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "querywarden.webhookService" -}}
{{- printf "%s-webhook" (include "querywarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "querywarden.certSecret" -}}
{{- printf "%s-webhook-tls" (include "querywarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* true when the webhook certificate comes from cert-manager. */}}
{{- define "querywarden.useCertManager" -}}
{{- $mode := .Values.webhook.certificates -}}
{{- if eq $mode "certManager" -}}true
{{- else if and (eq $mode "auto") (.Capabilities.APIVersions.Has "cert-manager.io/v1") -}}true
{{- else if or (eq $mode "helm") (eq $mode "auto") -}}false
{{- else -}}{{ fail "webhook.certificates must be auto, certManager or helm" }}
{{- end -}}
{{- end -}}

{{/* Namespaces never injected: the release's own and the configured ones. */}}
{{- define "querywarden.excludedNamespaces" -}}
{{- $excluded := list .Release.Namespace -}}
{{- range .Values.operator.excludedNamespaces -}}
{{- $excluded = append $excluded . -}}
{{- end -}}
{{- toJson (uniq $excluded) -}}
{{- end -}}

{{/* The MCP server (mcp.enabled): its names and labels, apart from the operator's. */}}
{{- define "querywarden.mcp.fullname" -}}
{{- printf "%s-mcp" (include "querywarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "querywarden.mcp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "querywarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mcp
{{- end -}}

{{- define "querywarden.mcp.labels" -}}
{{ include "querywarden.mcp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The URL clients reach the MCP server at: mcp.publicUrl, else the Service's. */}}
{{- define "querywarden.mcp.publicUrl" -}}
{{- if .Values.mcp.publicUrl -}}
{{- .Values.mcp.publicUrl -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%v/mcp" (include "querywarden.mcp.fullname" .) .Release.Namespace .Values.mcp.service.port -}}
{{- end -}}
{{- end -}}

{{/*
Where the SDK serves the protected resource metadata (RFC 9728): the well-known prefix
followed by the public URL's path (a lone "/" counts as none, as in the SDK). It needs no token, so the probes ask for it.
*/}}
{{- define "querywarden.mcp.metadataPath" -}}
{{- $path := (urlParse (include "querywarden.mcp.publicUrl" .)).path -}}
{{- if eq $path "/" }}{{ $path = "" }}{{ end -}}
{{- printf "/.well-known/oauth-protected-resource%s" $path -}}
{{- end -}}

{{/*
A CA for the MCP server, {configMap|secret: NAME, key: KEY}: checked, and its volume
source. Called with (list $ "mcp.ca" .Values.mcp.ca).
*/}}
{{- define "querywarden.mcp.caKey" -}}
{{- $what := index . 1 -}}
{{- $ca := index . 2 -}}
{{- if and $ca.configMap $ca.secret -}}
{{- fail (printf "%s: name a configMap or a secret, not both" $what) -}}
{{- end -}}
{{- if not (or $ca.configMap $ca.secret) -}}
{{- fail (printf "%s: name a configMap or a secret holding the CA certificate" $what) -}}
{{- end -}}
{{- default "ca.crt" $ca.key -}}
{{- end -}}

{{- define "querywarden.mcp.caVolume" -}}
{{- $ca := index . 2 -}}
{{- $key := include "querywarden.mcp.caKey" . -}}
{{- if $ca.configMap -}}
configMap:
  name: {{ $ca.configMap }}
  items: [{key: {{ $key | quote }}, path: {{ $key | quote }}}]
{{- else -}}
secret:
  secretName: {{ $ca.secret }}
  items: [{key: {{ $key | quote }}, path: {{ $key | quote }}}]
{{- end -}}
{{- end -}}
