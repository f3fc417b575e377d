{{- define "nnfabric.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "nnfabric.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: nnfabric
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "nnfabric.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nnfabric.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "nnfabric.fullname" .)) -}}
{{- end -}}

{{/* Settings every service reads (services/common/settings.py; prefix NNFABRIC_). */}}
{{- define "nnfabric.env" -}}
- name: NNFABRIC_REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ include "nnfabric.secretName" . }}, key: redis-url}}
- name: NNFABRIC_CATALOG
  value: /etc/nnfabric/catalog.yaml
- name: NNFABRIC_RESULT_TTL_S
  value: {{ .Values.settings.resultTtlS | quote }}
- name: NNFABRIC_MAX_ENVELOPE_BYTES
  value: {{ .Values.settings.maxEnvelopeBytes | int64 | quote }}
- name: NNFABRIC_QUEUE_TIMEOUT_S
  value: {{ .Values.settings.queueTimeoutS | quote }}
- name: NNFABRIC_RECLAIM_IDLE_MS
  value: {{ .Values.settings.reclaimIdleMs | quote }}
- name: NNFABRIC_BATCH_HOLD_MS
  value: {{ .Values.settings.batchHoldMs | quote }}
- name: NNFABRIC_RAY_NAMESPACE
  value: {{ .Values.settings.rayNamespace | quote }}
- name: NNFABRIC_HISTORY_INTERVAL_S
  value: {{ .Values.settings.historyIntervalS | quote }}
{{- if .Values.modelCache.enabled }}
# Large results go to the shared volume (replicas write, the api streams them, schedulers sweep).
- name: NNFABRIC_RESULT_STORE_DIR
  value: /models/results
{{- else }}
# No shared volume: every result stays in Redis.
- name: NNFABRIC_RESULT_STORE_MIN_BYTES
  value: "9223372036854775807"
{{- end }}
{{- end -}}

{{/* The shared volume (model cache and large results), for pods that read or write results. */}}
{{- define "nnfabric.sharedVolume" -}}
- name: models
  {{- if .Values.modelCache.enabled }}
  persistentVolumeClaim: {claimName: {{ .Values.modelCache.existingClaim | default (printf "%s-models" (include "nnfabric.fullname" .)) }}}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end -}}

{{/* Ray's token authentication, for every process that is or talks to a Ray node. */}}
{{- define "nnfabric.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom: {secretKeyRef: {name: {{ include "nnfabric.secretName" . }}, key: ray-token}}
{{- end -}}

{{- define "nnfabric.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid | default .uid }}
fsGroup: {{ .gid | default .uid }}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "nnfabric.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities: {drop: ["ALL"]}
{{- end -}}

{{/* GPUs per replica -> [replicas at least, replicas at most], over the catalog: one Ray
worker group per GPU count. A model with max_replicas may grow to it (KubeRay's autoscaler adds
the pods Serve's autoscaling asks for). */}}
{{- define "nnfabric.workerGroups" -}}
{{- $groups := dict -}}
{{- range .Values.models -}}
{{- $key := printf "%d" (int .gpus) -}}
{{- /* A model split into stages needs a pod of its stage shape for each stage of each replica. */ -}}
{{- $stages := int (.stages | default 1) -}}
{{- $low := mul $stages (int (.min_replicas | default .replicas | default 1)) -}}
{{- $high := mul $stages (int (.max_replicas | default .replicas | default 1)) -}}
{{- $old := get $groups $key | default (list 0 0) -}}
{{- $_ := set $groups $key (list (add (index $old 0) $low) (add (index $old 1) $high)) -}}
{{- end -}}
{{- toJson $groups -}}
{{- end -}}

{{- define "nnfabric.autoscaled" -}}
{{- range .Values.models -}}{{- if gt (int (.max_replicas | default 0)) (int (.min_replicas | default .replicas | default 1)) -}}yes{{- end -}}{{- end -}}
{{- end -}}
