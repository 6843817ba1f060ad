{{/*
Names. Kubernetes names are DNS labels: 63 characters at most.
*/}}
{{- define "embedding-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-service.fullname" -}}
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

{{- define "embedding-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name + instance only. A Deployment's selector is immutable, so nothing that
changes between upgrades (chart version, image tag, app version) may ever be added here.
*/}}
{{- define "embedding-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedding-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The server pods' selector: the selector labels plus a constant component, so the export Job's
pods (component: export) are never counted by the Service, the PDB or the HPA.
*/}}
{{- define "embedding-service.serverSelectorLabels" -}}
{{ include "embedding-service.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Standard labels on every resource.
*/}}
{{- define "embedding-service.labels" -}}
helm.sh/chart: {{ include "embedding-service.chart" . }}
{{ include "embedding-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedding-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "embedding-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedding-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
True ("true") when the provider runs on a GPU.
*/}}
{{- define "embedding-service.gpuProvider" -}}
{{- if has (.Values.config.provider | default "cpu") (list "cuda" "tensorrt") }}true{{ end }}
{{- end }}

{{/*
Images. The serving image's flavor (Dockerfile target) follows the provider unless set.
*/}}
{{- define "embedding-service.image" -}}
{{- $flavor := .Values.image.flavor | default (ternary "gpu" "cpu" (eq (include "embedding-service.gpuProvider" .) "true")) }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavor)) }}
{{- end }}
{{- end }}

{{- define "embedding-service.exportImage" -}}
{{- $img := .Values.model.export.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository ($img.tag | default (printf "%s-export" .Chart.AppVersion)) }}
{{- end }}
{{- end }}

{{/*
A path component from free text: "NVIDIA H100 80GB" -> "NVIDIA-H100-80GB".
*/}}
{{- define "embedding-service.pathKey" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]+" . "-" | trimAll "-" }}
{{- end }}

{{/*
Bundle directory name inside the model volume: explicit, or derived from source + precision.
*/}}
{{- define "embedding-service.bundleName" -}}
{{- if .Values.model.bundleName }}
{{- include "embedding-service.pathKey" .Values.model.bundleName }}
{{- else }}
{{- $src := .Values.model.export.source | replace "builtin:" "" | replace "/" "--" }}
{{- with .Values.model.export.revision }}
{{- $src = printf "%s-%s" $src (. | trunc 12) }}
{{- end }}
{{- include "embedding-service.pathKey" (printf "%s-%s" $src .Values.model.export.precision) }}
{{- end }}
{{- end }}

{{- define "embedding-service.modelDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (include "embedding-service.bundleName" .) }}
{{- end }}

{{/*
Where an extra model's volume is mounted: its mountPath, else /models-extra/<index>.
Usage: include "embedding-service.extraModelMount" (list $index $model)
*/}}
{{- define "embedding-service.extraModelMount" -}}
{{- $i := index . 0 }}{{- $m := index . 1 }}
{{- trimSuffix "/" ($m.mountPath | default (printf "/models-extra/%d" $i)) }}
{{- end }}

{{/*
EMBED_MODEL_DIR: the default model (model.*, named by model.name when set), then each of
extraModels as NAME=PATH, comma-separated.
*/}}
{{- define "embedding-service.modelDirs" -}}
{{- $first := include "embedding-service.modelDir" . }}
{{- if .Values.model.name }}{{ $first = printf "%s=%s" .Values.model.name $first }}{{ end }}
{{- $dirs := list $first }}
{{- range $i, $m := .Values.extraModels }}
{{- $dirs = append $dirs (printf "%s=%s/%s" $m.name (include "embedding-service.extraModelMount" (list $i $m)) $m.bundleName) }}
{{- end }}
{{- join "," $dirs }}
{{- end }}

{{/*
TensorRT cache directory, keyed by GPU type, TensorRT version and bundle.
*/}}
{{- define "embedding-service.trtCacheDir" -}}
{{- $gpu := required "trtCache.gpuType is required with config.provider=tensorrt: the engine cache is keyed by GPU type" .Values.trtCache.gpuType }}
{{- $trt := required "trtCache.tensorrtVersion is required with config.provider=tensorrt: the engine cache is keyed by TensorRT version" .Values.trtCache.tensorrtVersion }}
{{- printf "%s/%s/trt-%s/%s" (trimSuffix "/" .Values.trtCache.mountPath) (include "embedding-service.pathKey" $gpu) (include "embedding-service.pathKey" $trt) (include "embedding-service.bundleName" .) }}
{{- end }}

{{- define "embedding-service.modelClaimName" -}}
{{- .Values.model.persistence.existingClaim | default (printf "%s-model" (include "embedding-service.fullname" .)) }}
{{- end }}

{{- define "embedding-service.trtCacheClaimName" -}}
{{- .Values.trtCache.persistence.existingClaim | default (printf "%s-trt-cache" (include "embedding-service.fullname" .)) }}
{{- end }}

{{- define "embedding-service.apiKeysSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "embedding-service.fullname" .)) }}
{{- end }}

{{/*
Whole seconds the server may take to drain.
*/}}
{{- define "embedding-service.graceSeconds" -}}
{{- $g := .Values.config.grace_period_s | default 30 | float64 }}
{{- $c := $g | ceil | int }}
{{- $c }}
{{- end }}

{{- define "embedding-service.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (include "embedding-service.graceSeconds" . | int) (int .Values.terminationGraceExtraSeconds) }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express readably. They fail the render with the fix.
*/}}
{{- define "embedding-service.validate" -}}
{{- $gpuProvider := eq (include "embedding-service.gpuProvider" .) "true" }}
{{- if and $gpuProvider (lt (int .Values.gpu.count) 1) }}
{{- fail (printf "config.provider=%s needs a GPU: set gpu.count >= 1" .Values.config.provider) }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.keys) }}
{{- fail "auth.enabled needs auth.existingSecret or at least one entry in auth.keys" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mTLS) needs tls.enabled" }}
{{- end }}
{{- if and (not .Values.model.persistence.enabled) (not .Values.model.export.enabled) }}
{{- fail "model.persistence.enabled=false gives an empty volume: enable model.export or use a PVC with a bundle (model.persistence.existingClaim)" }}
{{- end }}
{{- if and .Values.model.export.enabled (eq .Values.model.export.mode "job") (not .Values.model.persistence.enabled) }}
{{- fail "model.export.mode=job writes into a PVC: set model.persistence.enabled=true (or use mode=initContainer)" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if hasPrefix "EMBED_" .name }}
{{- fail (printf "extraEnv: %s is a server setting: set %s under config (one place for settings)" .name (lower (trimPrefix "EMBED_" .name))) }}
{{- end }}
{{- end }}
{{- if and .Values.config.trt_fp16 .Values.config.trt_bf16 }}
{{- fail "config: choose one of trt_fp16 and trt_bf16" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.queueTime.enabled) (not .Values.autoscaling.gpuUtilization.enabled) (not .Values.autoscaling.extraMetrics) }}
{{- fail "autoscaling.enabled needs a metric: targetCPUUtilizationPercentage, queueTime, gpuUtilization or extraMetrics" }}
{{- end }}
{{- end }}

{{/*
Volumes holding a file the server reads: mount point of each secret.
*/}}
{{- define "embedding-service.apiKeysDir" -}}/etc/embed/api-keys{{- end }}
{{- define "embedding-service.tlsDir" -}}/etc/embed/tls{{- end }}
{{- define "embedding-service.clientCADir" -}}/etc/embed/client-ca{{- end }}
{{- define "embedding-service.probeDir" -}}/etc/embed/probe{{- end }}

{{/*
Server environment: the settings under .Values.config (one place) plus the paths the chart
manages. Every name is EMBED_<Settings field>; the chart tests check both directions.
*/}}
{{- define "embedding-service.env" -}}
- name: EMBED_HOST
  value: "0.0.0.0"
- name: EMBED_MODEL_DIR
  value: {{ include "embedding-service.modelDirs" . | quote }}
{{- if eq .Values.config.provider "tensorrt" }}
- name: EMBED_TRT_CACHE_DIR
  value: {{ include "embedding-service.trtCacheDir" . | quote }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: EMBED_API_KEYS_FILE
  value: {{ printf "%s/%s" (include "embedding-service.apiKeysDir" .) .Values.auth.secretKey | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: EMBED_TLS_CERT_FILE
  value: {{ printf "%s/%s" (include "embedding-service.tlsDir" .) .Values.tls.certKey | quote }}
- name: EMBED_TLS_KEY_FILE
  value: {{ printf "%s/%s" (include "embedding-service.tlsDir" .) .Values.tls.keyKey | quote }}
{{- if .Values.tls.clientCA.enabled }}
- name: EMBED_TLS_CLIENT_CA_FILE
  value: {{ printf "%s/%s" (include "embedding-service.clientCADir" .) .Values.tls.clientCA.key | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.config }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "EMBED_%s" (upper $key) }}
  value: {{ include "embedding-service.scalar" $value | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A setting's value as the string pydantic parses. YAML numbers arrive as float64: whole numbers
are printed as integers (8589934592, not 8.589934592e+09). A list (model_alias) is joined with commas.
*/}}
{{- define "embedding-service.scalar" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
A probe. Without TLS: native grpc. With TLS: exec of the bundled health-check script.
Usage: include "embedding-service.probe" (dict "root" $ "probe" .Values.probes.readiness)
*/}}
{{- define "embedding-service.probe" -}}
{{- $root := .root }}
{{- $p := .probe }}
{{- $port := int ($root.Values.config.port | default 50051) }}
{{- if $root.Values.tls.enabled }}
{{- $tlsDir := include "embedding-service.tlsDir" $root }}
{{- $serverName := $root.Values.tls.probeServerName | default (printf "%s.%s.svc" (include "embedding-service.fullname" $root) $root.Release.Namespace) }}
exec:
  command:
    - python
    - {{ printf "%s/grpc-health-check.py" (include "embedding-service.probeDir" $root) }}
    - {{ printf "--addr=127.0.0.1:%d" $port }}
    - {{ printf "--service=%s" $p.service | quote }}
    - {{ printf "--timeout=%d" (int $p.timeoutSeconds) | quote }}
    - --tls
    - {{ printf "--ca-file=%s/%s" $tlsDir $root.Values.tls.probeCAKey }}
    - {{ printf "--server-name=%s" $serverName }}
    {{- if $root.Values.tls.clientCA.enabled }}
    - {{ printf "--cert-file=%s/%s" $tlsDir $root.Values.tls.certKey }}
    - {{ printf "--key-file=%s/%s" $tlsDir $root.Values.tls.keyKey }}
    {{- end }}
{{- else }}
grpc:
  port: {{ $port }}
  service: {{ $p.service | quote }}
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- with $p.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{/*
The exporter container body (initContainer or Job): runs files/export-bundle.sh from the
scripts ConfigMap with the model volume writable and scratch space for downloads.
*/}}
{{- define "embedding-service.exportContainer" -}}
{{- $export := .Values.model.export -}}
image: {{ include "embedding-service.exportImage" . }}
imagePullPolicy: {{ $export.image.pullPolicy }}
command: [sh, /etc/embed/scripts/export-bundle.sh]
{{- $args := list }}
{{- with $export.revision }}
{{- $args = concat $args (list "--revision" .) }}
{{- end }}
{{- $args = concat $args ($export.extraArgs | default list) }}
{{- with $args }}
args:
  {{- toYaml . | nindent 2 }}
{{- end }}
env:
  - name: BUNDLE_SOURCE
    value: {{ $export.source | quote }}
  - name: BUNDLE_PRECISION
    value: {{ $export.precision | quote }}
  - name: BUNDLE_DIR
    value: {{ include "embedding-service.modelDir" . | quote }}
  - name: HOME
    value: /scratch
  - name: HF_HOME
    value: /scratch/hf
  - name: TMPDIR
    value: /scratch/tmp
  {{- with $export.hfTokenSecret.name }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $export.hfTokenSecret.key }}
  {{- end }}
  {{- with $export.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
resources:
  {{- toYaml $export.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: model
    mountPath: {{ .Values.model.mountPath }}
  - name: export-scratch
    mountPath: /scratch
  - name: scripts
    mountPath: /etc/embed/scripts
    readOnly: true
{{- end }}

{{- define "embedding-service.servicePorts" -}}
- name: grpc
  port: {{ .Values.service.ports.grpc }}
  targetPort: grpc
  protocol: TCP
  {{- if not .Values.tls.enabled }}
  appProtocol: kubernetes.io/h2c
  {{- end }}
{{- if not (kindIs "invalid" .Values.config.http_port) }}
- name: http
  port: {{ .Values.service.ports.http }}
  targetPort: http
  protocol: TCP
{{- end }}
{{- if not (kindIs "invalid" .Values.config.metrics_port) }}
- name: metrics
  port: {{ .Values.service.ports.metrics }}
  targetPort: metrics
  protocol: TCP
{{- end }}
{{- end }}
