{{/*
RBAC rules, grouped by where they apply. docs/security.md lists the same
rules in a table, and tests/tests/chart_rbac.rs checks that the rendered
chart grants exactly that table, no more, no less.

  cluster    always a ClusterRole
  watched    where the caches watch (WebhookEndpoints; the operator's processor
             Deployments): ClusterRole, or a Role in watchNamespace. Not narrowed
             by rbac.namespaces: without watchNamespace the operator and the
             gateway watch every namespace.
  workloads  where endpoints' Secrets, processors and Events live: ClusterRole,
             or a Role in each of rbac.namespaces (or watchNamespace)
  release    a Role in the release namespace
*/}}

{{- define "spillway.rules.operator.cluster" -}}
# Startup check that the CRD is served (lists at most one endpoint, cluster-wide).
- apiGroups: [spillway.dev]
  resources: [webhookendpoints]
  verbs: [list]
# A WebhookListener in another namespace than its endpoint: the labels of
# its namespace, for the endpoint's allowedListeners selector.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
{{- if .Values.operator.keda.enabled }}
# Is KEDA installed? Only this one CRD, only get.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames: [scaledobjects.keda.sh]
  verbs: [get]
{{- end }}
{{- end -}}

{{- define "spillway.rules.operator.watched" -}}
# Watch endpoints; add/remove the spillway.dev/cleanup finalizer (JSON patch).
- apiGroups: [spillway.dev]
  resources: [webhookendpoints]
  verbs: [list, watch, patch]
# Watch listeners (and their finalizer, spillway.dev/listener-cleanup); read
# the endpoint a listener names (get).
- apiGroups: [spillway.dev]
  resources: [webhooklisteners]
  verbs: [list, watch, patch]
- apiGroups: [spillway.dev]
  resources: [webhookendpoints]
  verbs: [get]
# Write status (server-side apply).
- apiGroups: [spillway.dev]
  resources: [webhookendpoints/status, webhooklisteners/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion on processor Deployments (needed
# where the OwnerReferencesPermissionEnforcement admission plugin is on).
- apiGroups: [spillway.dev]
  resources: [webhookendpoints/finalizers, webhooklisteners/finalizers]
  verbs: [update]
# The processor Deployment cache (label managed-by=spillway-operator), read-only;
# watched wherever endpoints are, so cluster-wide unless watchNamespace.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch]
{{- end -}}

{{- define "spillway.rules.operator.workloads" -}}
# Check that referenced Secrets and keys exist (by name; no list, no watch).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Processor Deployments: server-side apply, delete.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch, delete]
# Events on endpoints.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.operator.keda.enabled }}
# KEDA ScaledObjects for endpoints with autoscaler: keda.
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [create, patch, delete]
{{- end }}
{{- end -}}

{{- define "spillway.rules.operator.release" -}}
{{- if .Values.operator.leaderElection.enabled }}
# Leader election: create the Lease once, then read and renew only it.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "spillway.leaseName" . }}]
  verbs: [get, update]
{{- end }}
{{- end -}}

{{- define "spillway.rules.gateway.cluster" -}}
{{- end -}}

{{- define "spillway.rules.gateway.watched" -}}
# The routing table.
- apiGroups: [spillway.dev]
  resources: [webhookendpoints]
  verbs: [list, watch]
{{- end -}}

{{- define "spillway.rules.gateway.workloads" -}}
# Verification secrets: one watch per referenced Secret (fieldSelector
# metadata.name=NAME); RBAC cannot narrow by name before the names are known.
- apiGroups: [""]
  resources: [secrets]
  verbs: [list, watch]
{{- end -}}

{{- define "spillway.rules.gateway.release" -}}
{{- end -}}
