{{/*
Names, labels and the derived settings the templates share.
*/}}

{{/* The chart name, overridable. */}}
{{- define "plugboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: <release>-plugboard, or the release name alone when it already
contains the chart name. Truncated to 63 characters (DNS label); the headless Service adds "-headless", so
names used there stay within 63 too.
*/}}
{{- define "plugboard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "plugboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "plugboard.labels" -}}
helm.sh/chart: {{ include "plugboard.chart" . | quote }}
{{ include "plugboard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: plugboard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels that select the server pods (Deployment, Services, PDB). Never change them: selectors are immutable. */}}
{{- define "plugboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "plugboard.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: "server"
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "plugboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "plugboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag (tag defaults to appVersion; -cuda suffix with GPUs) or repository@digest. */}}
{{- define "plugboard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := toString (default .Chart.AppVersion .Values.image.tag) }}
{{- if and .Values.gpu.enabled (not (hasSuffix .Values.gpu.tagSuffix $tag)) }}
{{- $tag = printf "%s%s" $tag .Values.gpu.tagSuffix }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the bearer tokens. */}}
{{- define "plugboard.authSecretName" -}}
{{- default (printf "%s-auth" (include "plugboard.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Whether the server needs a tokens Secret at all. */}}
{{- define "plugboard.authEnabled" -}}
{{- if or .Values.auth.admin.enabled .Values.auth.inference.enabled }}true{{ end }}
{{- end }}

{{/* Whether the chart creates the tokens Secret. */}}
{{- define "plugboard.createAuthSecret" -}}
{{- if and (include "plugboard.authEnabled" .) (not .Values.auth.existingSecret) }}true{{ end }}
{{- end }}

{{/*
The token for one role ("admin" or "inference") in the created Secret: the value given, else the one the
Secret already holds in the cluster (lookup; empty offline), else a random one. The result is memoised in
.Values so the Secret and its checksum annotation on the pods see the same token in one render.
*/}}
{{- define "plugboard.token" -}}
{{- $role := .role }}
{{- $root := .root }}
{{- $cfg := index $root.Values.auth $role }}
{{- $memo := printf "_generated_%s" $role }}
{{- if not (hasKey $root.Values.auth $memo) }}
{{- $token := $cfg.token }}
{{- if not $token }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "plugboard.authSecretName" $root) }}
{{- if and $existing $existing.data (hasKey $existing.data $cfg.key) }}
{{- $token = index $existing.data $cfg.key | b64dec }}
{{- else }}
{{- $token = randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- $_ := set $root.Values.auth $memo $token }}
{{- end }}
{{- index $root.Values.auth $memo }}
{{- end }}

{{/* Name of the Secret with the S3 credentials, empty when the pods use their role. */}}
{{- define "plugboard.s3SecretName" -}}
{{- if .Values.registry.s3.existingSecret }}
{{- .Values.registry.s3.existingSecret }}
{{- else if .Values.registry.s3.accessKeyId }}
{{- printf "%s-s3" (include "plugboard.fullname" .) }}
{{- end }}
{{- end }}

{{/* The --registry argument: a directory on the registry volume, or s3://bucket/prefix. */}}
{{- define "plugboard.registryArg" -}}
{{- if eq .Values.registry.type "s3" }}
{{- $prefix := trimAll "/" .Values.registry.s3.prefix }}
{{- if $prefix }}
{{- printf "s3://%s/%s" .Values.registry.s3.bucket $prefix }}
{{- else }}
{{- printf "s3://%s" .Values.registry.s3.bucket }}
{{- end }}
{{- else }}
{{- "/var/lib/plugboard/registry" }}
{{- end }}
{{- end }}

{{/*
--registry-cache-bytes: 80% of registry.s3.cacheSize (a quantity in Mi, Gi or Ti), leaving room on the
emptyDir for files being downloaded and the cache's own bookkeeping.
*/}}
{{- define "plugboard.s3CacheBytes" -}}
{{- $size := toString .Values.registry.s3.cacheSize }}
{{- $number := regexFind "^[0-9]+" $size }}
{{- $unit := trimPrefix $number $size }}
{{- $bytes := mul (int64 $number) (get (dict "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit) }}
{{- div (mul $bytes 4) 5 }}
{{- end }}

{{/* Whether the registry is a ReadWriteOnce claim the chart creates. */}}
{{- define "plugboard.registryRWO" -}}
{{- $pvc := .Values.registry.pvc }}
{{- if and (eq .Values.registry.type "pvc") (not $pvc.existingClaim) (not (has "ReadWriteMany" $pvc.accessModes)) }}true{{ end }}
{{- end }}

{{/*
A value as a flag's text: whole numbers without a decimal point or exponent (values arrive as float64,
which would print 1048576 as 1.048576e+06).
*/}}
{{- define "plugboard.flagValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds: the value given, else the drain grace period + 15 s. */}}
{{- define "plugboard.terminationGracePeriod" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (ceil .Values.server.gracePeriod | int) 15 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/* The name the exec probes check the server certificate for. */}}
{{- define "plugboard.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "plugboard.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/*
One probe's handler and timing. Plaintext: Kubernetes' grpc probe on the health service. TLS: grpc probes
do not speak TLS, so `plugboard health` runs in the container (exit 0 only when SERVING).
Call with (dict "root" $ "probe" .Values.probes.liveness).
*/}}
{{- define "plugboard.probe" -}}
{{- $root := .root }}
{{- $probe := .probe }}
{{- if $root.Values.tls.enabled }}
exec:
  command:
    - plugboard
    - --target
    - {{ printf "127.0.0.1:%d" (int $root.Values.server.port) | quote }}
    - --timeout
    - {{ $probe.timeoutSeconds | quote }}
    - --tls-ca
    - /etc/plugboard/tls/ca.crt
    - --tls-server-name
    - {{ include "plugboard.tlsServerName" $root | quote }}
    {{- if $root.Values.tls.mutual }}
    - --tls-cert
    - /etc/plugboard/probe-tls/tls.crt
    - --tls-key
    - /etc/plugboard/probe-tls/tls.key
    {{- end }}
    - health
    - --service
    - {{ $probe.service | quote }}
{{- else }}
grpc:
  port: {{ $root.Values.server.port }}
  service: {{ $probe.service | quote }}
{{- end }}
periodSeconds: {{ $probe.periodSeconds }}
timeoutSeconds: {{ $probe.timeoutSeconds }}
failureThreshold: {{ $probe.failureThreshold }}
{{- with $probe.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{/*
Checks across values that the schema cannot express; each fails the render with what to change.
*/}}
{{- define "plugboard.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.registry.type "s3") (not $v.registry.s3.bucket) }}
{{- fail "registry.type s3 needs registry.s3.bucket" }}
{{- end }}
{{- if and $v.registry.s3.accessKeyId (not $v.registry.s3.secretAccessKey) }}
{{- fail "registry.s3.accessKeyId needs registry.s3.secretAccessKey" }}
{{- end }}
{{- $replicas := ternary (int $v.autoscaling.maxReplicas) (int $v.replicaCount) $v.autoscaling.enabled }}
{{- if and (include "plugboard.registryRWO" .) (gt $replicas 1) }}
{{- fail "registry.pvc: more than one replica cannot share a ReadWriteOnce claim; set registry.pvc.accessModes to [ReadWriteMany] (a filesystem with POSIX locks), or use registry.type s3" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.waitingRequests.enabled) (kindIs "invalid" $v.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling needs a metric: autoscaling.waitingRequests.enabled or a CPU / memory target" }}
{{- end }}
{{- if le (int (include "plugboard.terminationGracePeriod" .)) (ceil $v.server.gracePeriod | int) }}
{{- fail "terminationGracePeriodSeconds must exceed server.gracePeriod, or the kubelet kills the server before it has drained" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and $v.tls.enabled $v.tls.mutual (not $v.tls.probeClientSecretName) }}
{{- fail "tls.mutual needs tls.probeClientSecretName: a client certificate for the health probes, which must pass the handshake too" }}
{{- end }}
{{- if and (not $v.auth.existingSecret) $v.auth.admin.enabled $v.auth.inference.enabled $v.auth.admin.token (eq $v.auth.admin.token $v.auth.inference.token) }}
{{- fail "auth.admin.token and auth.inference.token must differ" }}
{{- end }}
{{- if and $v.podDisruptionBudget.enabled (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget needs minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}
