{{- define "testbed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "testbed.fullname" -}}
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

{{- define "testbed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "testbed.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "testbed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testbed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "testbed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "testbed.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "testbed.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Name of the head Service that KubeRay creates for the RayCluster. */}}
{{- define "testbed.rayHeadService" -}}
{{ include "testbed.fullname" . | trunc 54 | trimSuffix "-" }}-head-svc
{{- end }}

{{- define "testbed.agentSecret" -}}
{{- default (printf "%s-node-agent" (include "testbed.fullname" .)) .Values.nodeAgent.existingSecret }}
{{- end }}

{{/* "auto" means: render when the cluster serves the Prometheus operator API. */}}
{{- define "testbed.promOperator" -}}
{{- $v := .value }}
{{- if or (eq (toString $v) "true") (and (eq (toString $v) "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end }}
{{- end }}

{{- define "testbed.modelVolume" -}}
- name: model
{{- if .Values.model.source.pvcClaimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.source.pvcClaimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.model.source.hostPath }}
    type: Directory
{{- end }}
{{- end }}

{{/* Writable scratch for a read-only root filesystem. */}}
{{- define "testbed.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{/* The Secret holding the Ray cluster's authentication token (RAY_AUTH_MODE=token): every Ray process of the
     release (head, workers, the front door's Ray client) reads it. */}}
{{- define "testbed.raySecret" -}}
{{- default (printf "%s-ray-auth" (include "testbed.fullname" .)) .Values.serving.rayAuth.existingSecret }}
{{- end }}

{{/* Env of every Ray process: Ray's token authentication with the token from the Secret. */}}
{{- define "testbed.rayAuthEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "testbed.raySecret" . }}, key: token}
{{- end }}
