{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "nest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed with the chart name unless it has it. */}}
{{- define "nest.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "api"). */}}
{{- define "nest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nest.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* Standard labels; call with (dict "ctx" $ "component" "api"), component may be empty. */}}
{{- define "nest.labels" -}}
helm.sh/chart: {{ include "nest.chart" .ctx }}
{{ include "nest.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: nest
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "nest.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "nest.serviceAccountName" -}}
{{- include "nest.fullname" . }}
{{- end }}

{{- define "nest.provisionerServiceAccountName" -}}
{{- printf "%s-provisioner" (include "nest.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A secretKeyRef env entry; call with (list "NEST_X" secretName key). */}}
{{- define "nest.secretEnv" -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ index . 1 }}
      key: {{ index . 2 }}
{{- end }}
