{{/* Name of the chart, overridable. */}}
{{- define "spillway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name. */}}
{{- define "spillway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "spillway.operator.fullname" -}}{{ include "spillway.fullname" . }}-operator{{- end -}}
{{- define "spillway.gateway.fullname" -}}{{ include "spillway.fullname" . }}-gateway{{- end -}}

{{/* Labels on every object. */}}
{{- define "spillway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "spillway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spillway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component: (dict "ctx" $ "component" "operator"). */}}
{{- define "spillway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spillway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a component's objects. */}}
{{- define "spillway.componentLabels" -}}
{{ include "spillway.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image reference: (dict "repository" r "tag" t "digest" d "ctx" $) */}}
{{- define "spillway.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (default .ctx.Chart.AppVersion .tag) -}}
{{- end -}}
{{- end -}}

{{- define "spillway.image" -}}
{{- include "spillway.imageRef" (dict "repository" .Values.image.repository "tag" .Values.image.tag "digest" .Values.image.digest "ctx" .) -}}
{{- end -}}

{{/* The processor image: its own settings, falling back to image.*. */}}
{{- define "spillway.processorImage" -}}
{{- $p := .Values.processor.image -}}
{{- if or $p.repository $p.tag $p.digest -}}
{{- include "spillway.imageRef" (dict "repository" (default .Values.image.repository $p.repository) "tag" $p.tag "digest" $p.digest "ctx" .) -}}
{{- else -}}
{{- include "spillway.image" . -}}
{{- end -}}
{{- end -}}

{{- define "spillway.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "spillway.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "spillway.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "spillway.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Namespaces that get Roles for the "workloads" rules (Secrets, processor
Deployments, Events, ScaledObjects). Empty list = a ClusterRole instead.
Returned as JSON: include then fromJsonArray.
*/}}
{{- define "spillway.workloadNamespaces" -}}
{{- if .Values.rbac.namespaces -}}
{{- toJson (uniq .Values.rbac.namespaces) -}}
{{- else if .Values.watchNamespace -}}
{{- toJson (list .Values.watchNamespace) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/*
NATS credentials and TLS files of one component, shared by the operator and
gateway pods. Call with (dict "ctx" $ "component" "operator"|"gateway"): the
CA and `nats.tls.required` are common, the credentials file and client
certificate are the component's own (`nats.credentials` and
`nats.tls.clientSecretName` for the operator, `nats.gatewayCredentials` and
`nats.tls.gatewayClientSecretName` for the gateway).
*/}}
{{- define "spillway.natsFiles" -}}
{{- $nats := .ctx.Values.nats -}}
{{- $gw := eq .component "gateway" -}}
{{- $creds := ternary $nats.gatewayCredentials $nats.credentials $gw -}}
{{- $client := ternary $nats.tls.gatewayClientSecretName $nats.tls.clientSecretName $gw -}}
{{- dict "credsSecret" $creds.secretName "credsKey" $creds.key "caSecret" $nats.tls.caSecretName "caKey" $nats.tls.caKey "clientSecret" $client "required" $nats.tls.required | toJson -}}
{{- end -}}

{{/* NATS environment of one component (see spillway.natsFiles). */}}
{{- define "spillway.natsEnv" -}}
{{- $f := include "spillway.natsFiles" . | fromJson -}}
{{- if $f.credsSecret }}
- name: SPILLWAY_NATS_CREDS_FILE
  value: /etc/spillway/nats/creds/{{ $f.credsKey }}
{{- end }}
{{- if $f.caSecret }}
- name: SPILLWAY_NATS_TLS_CA_FILE
  value: /etc/spillway/nats/ca/{{ $f.caKey }}
{{- end }}
{{- if $f.clientSecret }}
- name: SPILLWAY_NATS_TLS_CERT_FILE
  value: /etc/spillway/nats/client/tls.crt
- name: SPILLWAY_NATS_TLS_KEY_FILE
  value: /etc/spillway/nats/client/tls.key
{{- end }}
{{- if $f.required }}
- name: SPILLWAY_NATS_TLS_REQUIRED
  value: "true"
{{- end }}
{{- end -}}

{{/* NATS volume mounts of one component, read-only (see spillway.natsFiles). */}}
{{- define "spillway.natsVolumeMounts" -}}
{{- $f := include "spillway.natsFiles" . | fromJson -}}
{{- if $f.credsSecret }}
- name: nats-creds
  mountPath: /etc/spillway/nats/creds
  readOnly: true
{{- end }}
{{- if $f.caSecret }}
- name: nats-ca
  mountPath: /etc/spillway/nats/ca
  readOnly: true
{{- end }}
{{- if $f.clientSecret }}
- name: nats-client-tls
  mountPath: /etc/spillway/nats/client
  readOnly: true
{{- end }}
{{- end -}}

{{/* NATS volumes of one component (see spillway.natsFiles). */}}
{{- define "spillway.natsVolumes" -}}
{{- $f := include "spillway.natsFiles" . | fromJson -}}
{{- with $f.credsSecret }}
- name: nats-creds
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with $f.caSecret }}
- name: nats-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
{{- end }}
{{- with $f.clientSecret }}
- name: nats-client-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The pod security context, with fsGroup so mounted Secrets are readable. */}}
{{- define "spillway.podSecurityContext" -}}
{{- $psc := deepCopy .Values.podSecurityContext -}}
{{- if .Values.platformAssignsIds -}}
{{- $_ := unset $psc "runAsUser" -}}
{{- $_ := unset $psc "runAsGroup" -}}
{{- $_ := unset $psc "fsGroup" -}}
{{- else if not (hasKey $psc "fsGroup") -}}
{{- $_ := set $psc "fsGroup" (default 65532 .Values.podSecurityContext.runAsGroup) -}}
{{- end -}}
{{- toYaml $psc -}}
{{- end -}}

{{/*
A probe on the admin port: (dict "path" "/readyz" "timings" $values.readinessProbe).
*/}}
{{- define "spillway.probe" -}}
httpGet:
  path: {{ .path }}
  port: admin
{{- with .timings }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Cross-field checks the schema cannot express; fail with what to change. */}}
{{- define "spillway.validate" -}}
{{- if and .Values.watchNamespace .Values.rbac.namespaces -}}
{{- if not (and (eq (len .Values.rbac.namespaces) 1) (eq (index .Values.rbac.namespaces 0) .Values.watchNamespace)) -}}
{{- fail (printf "rbac.namespaces: with watchNamespace %q only endpoints in that namespace are served; leave rbac.namespaces empty (or set it to [%q])" .Values.watchNamespace .Values.watchNamespace) -}}
{{- end -}}
{{- end -}}
{{- if .Values.gateway.autoscaling.enabled -}}
{{- if gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas) -}}
{{- fail (printf "gateway.autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" .Values.gateway.autoscaling.minReplicas .Values.gateway.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- $kv := .Capabilities.KubeVersion.Version -}}
{{- /* Unstamped source builds (v0.0.0-master+$Format:%H$) do not parse. */ -}}
{{- $known := regexMatch "^v?[0-9]+[.][0-9]+[.][0-9]+(-[0-9A-Za-z.-]+)?([+][0-9A-Za-z.-]+)?$" $kv -}}
{{- if and .Values.pathPolicy.requireNamespacePrefix $known (semverCompare "<1.30.0-0" $kv) -}}
{{- fail (printf "pathPolicy.requireNamespacePrefix needs Kubernetes 1.30 or newer (admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy); this cluster is %s" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and (has "Deny" .Values.pathPolicy.validationActions) (has "Warn" .Values.pathPolicy.validationActions) -}}
{{- fail "pathPolicy.validationActions: Deny and Warn may not be used together (Deny already tells the client why)" -}}
{{- end -}}
{{- range $name, $m := dict "metrics.serviceMonitor" .Values.metrics.serviceMonitor "metrics.podMonitor" .Values.metrics.podMonitor -}}
{{- if $m.scrapeTimeout -}}
{{- if gt (include "spillway.durationNanos" $m.scrapeTimeout | int64) (include "spillway.durationNanos" $m.interval | int64) -}}
{{- fail (printf "%s.scrapeTimeout (%s) is longer than %s.interval (%s): Prometheus refuses such a scrape; shorten it or leave it empty" $name $m.scrapeTimeout $name $m.interval) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.gateway.terminationGracePeriodSeconds -}}
{{- $t := include "spillway.gateway.shutdownTimes" $ | fromYaml -}}
{{- if le (mul (int64 .) 1000000000) (int64 $t.totalNanos) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must exceed gateway.config.drainDelay (%s) + shutdownGrace (%s) + publishTimeout (%s) = %vs, or the kubelet kills the gateway before in-flight webhooks are stored: set it to at least %d, or to null so the chart computes it (%d)" . $t.drainDelay $t.shutdownGrace $t.publishTimeout (divf $t.totalNanos 1000000000) (add1 (div (int64 $t.totalNanos) 1000000000)) (int64 $t.computedSeconds)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Nanoseconds of a Go-style duration string (the schema allows whole ms, s,
m and h parts). Sprig has no duration parser, but dateModify adds one to a
time with Go's time.ParseDuration.
*/}}
{{- define "spillway.durationNanos" -}}
{{- $epoch := toDate "2006-01-02" "2000-01-01" -}}
{{- sub (mustDateModify . $epoch).UnixNano $epoch.UnixNano -}}
{{- end -}}

{{/*
The gateway's shutdown as YAML: drainDelay, shutdownGrace and
publishTimeout (values or the gateway's defaults), their sum (totalNanos),
the chart's grace period for it (computedSeconds: the sum rounded up plus
5s of slack for the process to exit) and the pod's
terminationGracePeriodSeconds (graceSeconds: the configured one, else
computedSeconds).
*/}}
{{- define "spillway.gateway.shutdownTimes" -}}
{{- $c := .Values.gateway.config | default dict -}}
{{- $drain := $c.drainDelay | default "5s" -}}
{{- $grace := $c.shutdownGrace | default "25s" -}}
{{- $publish := $c.publishTimeout | default "5s" -}}
{{- $ns := add (include "spillway.durationNanos" $drain | int64) (include "spillway.durationNanos" $grace | int64) (include "spillway.durationNanos" $publish | int64) -}}
{{- $computed := add (div (add $ns 999999999) 1000000000) 5 -}}
drainDelay: {{ $drain | quote }}
shutdownGrace: {{ $grace | quote }}
publishTimeout: {{ $publish | quote }}
totalNanos: {{ $ns }}
computedSeconds: {{ $computed }}
graceSeconds: {{ .Values.gateway.terminationGracePeriodSeconds | default $computed }}
{{- end -}}

{{- define "spillway.leaseName" -}}
{{- default (include "spillway.operator.fullname" .) .Values.operator.leaderElection.leaseName -}}
{{- end -}}
