{{/* Names. Everything is prefixed with the release's fullname so two releases share a namespace. */}}
{{- define "jobtide.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "jobtide.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "jobtide.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every object of the release carries, whoever creates it (the chart, or the scaler for
worker Jobs): the app's name (it follows nameOverride), version and suite, over commonLabels.
*/}}
{{- define "jobtide.appLabels" -}}
{{- $labels := dict "app.kubernetes.io/name" (include "jobtide.name" .) "app.kubernetes.io/version" .Chart.AppVersion "app.kubernetes.io/part-of" "jobtide" }}
{{- toYaml (mustMergeOverwrite (deepCopy (.Values.commonLabels | default dict)) $labels) }}
{{- end }}

{{/*
Labels of an object the chart renders, as YAML:
  include "jobtide.labels" (dict "root" $ "component" "scaler" "extra" $podLabels)
`extra` (optional) goes under the chart's labels, so it can never change a selector label.
*/}}
{{- define "jobtide.labels" -}}
{{- $labels := include "jobtide.appLabels" .root | fromYaml }}
{{- $_ := set $labels "helm.sh/chart" (include "jobtide.chart" .root) }}
{{- $_ := set $labels "app.kubernetes.io/managed-by" .root.Release.Service }}
{{- $labels = mustMergeOverwrite $labels (include "jobtide.selectorLabels" . | fromYaml) }}
{{- toYaml (mustMergeOverwrite (deepCopy (.extra | default dict)) $labels) }}
{{- end }}

{{/* The labels that select a component's pods: (dict "root" $ "component" "worker"). */}}
{{- define "jobtide.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobtide.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Objects per component. */}}
{{- define "jobtide.scaler.fullname" -}}{{ include "jobtide.fullname" . }}-scaler{{- end }}
{{- define "jobtide.rabbitmq.fullname" -}}{{ include "jobtide.fullname" . }}-rabbitmq{{- end }}

{{/* "true" when the release's broker is a cluster of several members (rabbitmq.replicas). */}}
{{- define "jobtide.rabbitmq.clustered" -}}
{{- if and .Values.rabbitmq.enabled (gt (int64 .Values.rabbitmq.replicas) 1) }}true{{ end }}
{{- end }}

{{/* The members' pod names, one a line: the StatefulSet's pods 0 to replicas - 1. */}}
{{- define "jobtide.rabbitmq.members" -}}
{{- $fullname := include "jobtide.rabbitmq.fullname" . }}
{{- range $i := until (int .Values.rabbitmq.replicas) }}
{{ printf "%s-%d" $fullname $i }}
{{- end }}
{{- end }}

{{/* A member's Erlang node name, by pod name: `rabbit@POD.HEADLESS.NAMESPACE`, resolved by the
cluster DNS through the pod's search domains (the headless Service publishes not-ready pods,
so the members find each other while they start). */}}
{{- define "jobtide.rabbitmq.nodeName" -}}
{{- printf "rabbit@%s.%s-headless.%s" .pod (include "jobtide.rabbitmq.fullname" .root) .root.Release.Namespace }}
{{- end }}

{{/* The annotation the pre-delete hook sets on every member: its pre-stop then leaves at once
(an uninstall stops every member, so none could keep a majority). */}}
{{- define "jobtide.rabbitmq.uninstallingAnnotation" -}}jobtide.io/uninstalling{{- end }}
{{- /* The ConfigMap of the scaler's status figures (scaler-status-configmap.yaml). */}}
{{- define "jobtide.scaler.statusName" -}}{{ include "jobtide.scaler.fullname" . }}-status{{- end }}

{{- define "jobtide.scaler.serviceAccountName" -}}
{{- if .Values.scaler.serviceAccount.create }}
{{- default (include "jobtide.scaler.fullname" .) .Values.scaler.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.scaler.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jobtide.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The Secret holding the broker's `username` and `password` (and, in the release, `erlang-cookie`). */}}
{{- define "jobtide.broker.secretName" -}}
{{- if .Values.rabbitmq.enabled }}
{{- default (include "jobtide.rabbitmq.fullname" .) .Values.rabbitmq.existingSecret }}
{{- else }}
{{- .Values.externalBroker.existingSecret }}
{{- end }}
{{- end }}

{{/* Broker environment for the scaler and the workers (docs/architecture.md); the variables'
names come from _env-names.tpl. */}}
{{- define "jobtide.broker.env" -}}
{{- if .Values.rabbitmq.enabled }}
- name: {{ include "jobtide.env.BROKER_HOST" . }}
  value: {{ printf "%s.%s.svc" (include "jobtide.rabbitmq.fullname" .) .Release.Namespace | quote }}
- name: {{ include "jobtide.env.BROKER_PORT" . }}
  value: {{ .Values.rabbitmq.service.amqpPort | quote }}
- name: {{ include "jobtide.env.BROKER_VHOST" . }}
  value: {{ .Values.rabbitmq.vhost | quote }}
- name: {{ include "jobtide.env.BROKER_TLS" . }}
  value: "false"
{{- if include "jobtide.rabbitmq.clustered" . }}
- name: {{ include "jobtide.env.QUORUM_INITIAL_GROUP_SIZE" . }}
  value: {{ .Values.rabbitmq.replicas | quote }}
{{- end }}
{{- else }}
- name: {{ include "jobtide.env.BROKER_HOST" . }}
  value: {{ .Values.externalBroker.host | quote }}
- name: {{ include "jobtide.env.BROKER_PORT" . }}
  value: {{ .Values.externalBroker.port | quote }}
- name: {{ include "jobtide.env.BROKER_VHOST" . }}
  value: {{ .Values.externalBroker.vhost | quote }}
- name: {{ include "jobtide.env.BROKER_TLS" . }}
  value: {{ .Values.externalBroker.tls.enabled | quote }}
{{- if include "jobtide.broker.caMounted" . }}
- name: {{ include "jobtide.env.BROKER_CA_FILE" . }}
  value: {{ printf "%s/ca.crt" (include "jobtide.broker.caDir" .) | quote }}
{{- end }}
{{- with .Values.externalBroker.tls.serverName }}
- name: {{ include "jobtide.env.BROKER_SERVER_NAME" . }}
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- /* The management API: the scaler reads queue counts there, an idle worker its queue's
counters (quietCheckSeconds). Same host and TLS as AMQP (the bundled broker's Service port
`management`; externalBroker.managementPort). */}}
- name: {{ include "jobtide.env.BROKER_MANAGEMENT_PORT" . }}
  value: {{ include "jobtide.broker.managementPort" . | quote }}
- name: {{ include "jobtide.env.BROKER_USERNAME_FILE" . }}
  value: {{ printf "%s/username" (include "jobtide.broker.credentialsDir" .) | quote }}
- name: {{ include "jobtide.env.BROKER_PASSWORD_FILE" . }}
  value: {{ printf "%s/password" (include "jobtide.broker.credentialsDir" .) | quote }}
{{- end }}

{{/*
The broker's credentials reach the scaler and the workers as files, never as environment
values: a process's environment is copied to its children, printed by debugging tools and
shown in the pod spec, a mounted file is none of these. The volume holds the Secret's
username and password only (not the Erlang cookie), readable by the owner and the pod's
fsGroup (kubelet gives the files that group), which validate.yaml requires on every pod that
mounts it. Kubelet updates the files in place when the Secret changes; the programs read them
each time they connect.
*/}}
{{- define "jobtide.broker.credentialsDir" -}}/etc/jobtide/broker-credentials{{- end }}

{{- define "jobtide.broker.credentialsVolume" -}}
- name: jobtide-broker-credentials
  secret:
    secretName: {{ include "jobtide.broker.secretName" . | quote }}
    items: [{key: username, path: username}, {key: password, path: password}]
    defaultMode: 0440
{{- end }}

{{- define "jobtide.broker.credentialsVolumeMount" -}}
- {name: jobtide-broker-credentials, mountPath: {{ include "jobtide.broker.credentialsDir" . }}, readOnly: true}
{{- end }}

{{/*
The external broker's CA bundle, from the user's Secret (externalBroker.tls.caSecret): "true"
when the scaler and the workers mount it, empty otherwise; its volume, and its read-only mount
at "jobtide.broker.caDir" (the file is always ca.crt there, whatever the Secret's key).
*/}}
{{- define "jobtide.broker.caMounted" -}}
{{- $tls := .Values.externalBroker.tls }}
{{- if and (not .Values.rabbitmq.enabled) $tls.enabled $tls.caSecret.name }}true{{ end }}
{{- end }}

{{- define "jobtide.broker.caDir" -}}/etc/jobtide/broker-ca{{- end }}

{{- define "jobtide.broker.caVolume" -}}
- name: broker-ca
  secret:
    secretName: {{ .Values.externalBroker.tls.caSecret.name | quote }}
    items: [{key: {{ .Values.externalBroker.tls.caSecret.key | quote }}, path: ca.crt}]
    defaultMode: 0444
{{- end }}

{{- define "jobtide.broker.caVolumeMount" -}}
- {name: broker-ca, mountPath: {{ include "jobtide.broker.caDir" . }}, readOnly: true}
{{- end }}

{{- define "jobtide.broker.managementPort" -}}
{{- if .Values.rabbitmq.enabled }}{{ .Values.rabbitmq.service.managementPort }}{{ else }}{{ .Values.externalBroker.managementPort }}{{ end }}
{{- end }}

{{/*
`over` merged into a copy of `base`, as YAML: maps merge key by key at every depth, anything
else in `over` replaces, and a key set in `over` wins even when false, 0 or empty (sprig's
merge functions skip those, which would keep a default the user turned off).
  include "jobtide.merge" (dict "base" $defaults "over" $userValues) | fromYaml
*/}}
{{- define "jobtide.merge" -}}
{{- $merged := deepCopy (.base | default dict) }}
{{- range $key, $value := (.over | default dict) }}
{{- $current := get $merged $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $merged $key (include "jobtide.merge" (dict "base" $current "over" $value) | fromYaml) }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/* Pipelines with pipelineDefaults merged under each one, as YAML of a name -> settings map. */}}
{{- define "jobtide.pipelines" -}}
{{- $out := dict }}
{{- range $name, $pipeline := .Values.pipelines }}
{{- $_ := set $out $name (include "jobtide.merge" (dict "base" $.Values.pipelineDefaults "over" $pipeline) | fromYaml) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Consumer timeout in milliseconds: above the longest task of any pipeline. */}}
{{- define "jobtide.rabbitmq.consumerTimeoutMs" -}}
{{- if .Values.rabbitmq.consumerTimeoutSeconds }}
{{- mul (int64 .Values.rabbitmq.consumerTimeoutSeconds) 1000 }}
{{- else }}
{{- $longest := 0.0 }}
{{- range $name, $p := (include "jobtide.pipelines" . | fromYaml) }}
{{- $longest = maxf $longest $p.maxTaskSeconds }}
{{- end }}
{{- /* Same rule as jobtide_worker.topology.broker_consumer_timeout_ms: never below 30 min. */}}
{{- max 1800000 (int64 (include "jobtide.consumerTimeoutMs" $longest)) }}
{{- end }}
{{- end }}

{{/*
Fails the render with the message given. `helm lint` replaces `fail` with a function that only
logs and lets the render go on, so a chart's own rules would pass `helm lint --strict`; reaching
the line after `fail` means that happened, and including a template that does not exist is an
error lint reports, with the message in it (as the missing template's name).
*/}}
{{- define "jobtide.fail" -}}
{{- fail . }}
{{- include (printf "values rejected: %s" .) dict }}
{{- end }}

{{- /* The consumer timeout (ms) of tasks taking up to the given maxTaskSeconds: the rule of
jobtide_worker.topology.consumer_timeout_ms, a 60 s margin (maxTaskSeconds may have a
fraction). The chart tests compare both. */}}
{{- define "jobtide.consumerTimeoutMs" -}}
{{- int64 (ceil (mulf (addf . 60) 1000)) }}
{{- end }}
