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

{{/* Labels: standard app.kubernetes.io set; selectors use name + instance + component. */}}
{{- define "jobtide.labels" -}}
helm.sh/chart: {{ include "jobtide.chart" . }}
app.kubernetes.io/name: {{ include "jobtide.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jobtide
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "jobtide.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobtide.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Objects per component. */}}
{{- define "jobtide.scaler.fullname" -}}{{ include "jobtide.fullname" . }}-scaler{{- end }}
{{- define "jobtide.rabbitmq.fullname" -}}{{ include "jobtide.fullname" . }}-rabbitmq{{- end }}

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

{{/* Broker environment for the scaler and the workers (docs/architecture.md). */}}
{{- define "jobtide.broker.env" -}}
{{- $secret := include "jobtide.broker.secretName" . -}}
{{- if .Values.rabbitmq.enabled }}
- name: JOBTIDE_BROKER_HOST
  value: {{ printf "%s.%s.svc" (include "jobtide.rabbitmq.fullname" .) .Release.Namespace | quote }}
- name: JOBTIDE_BROKER_PORT
  value: {{ .Values.rabbitmq.service.amqpPort | quote }}
- name: JOBTIDE_BROKER_VHOST
  value: {{ .Values.rabbitmq.vhost | quote }}
- name: JOBTIDE_BROKER_TLS
  value: "false"
{{- else }}
- name: JOBTIDE_BROKER_HOST
  value: {{ .Values.externalBroker.host | quote }}
- name: JOBTIDE_BROKER_PORT
  value: {{ .Values.externalBroker.port | quote }}
- name: JOBTIDE_BROKER_VHOST
  value: {{ .Values.externalBroker.vhost | quote }}
- name: JOBTIDE_BROKER_TLS
  value: {{ .Values.externalBroker.tls | quote }}
{{- end }}
- name: JOBTIDE_BROKER_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: username}
- name: JOBTIDE_BROKER_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: password}
{{- end }}

{{- define "jobtide.broker.managementPort" -}}
{{- if .Values.rabbitmq.enabled }}{{ .Values.rabbitmq.service.managementPort }}{{ else }}{{ .Values.externalBroker.managementPort }}{{ end }}
{{- end }}

{{/* Pipelines with pipelineDefaults merged under each one, as YAML of a name -> settings map. */}}
{{- define "jobtide.pipelines" -}}
{{- $out := dict }}
{{- range $name, $pipeline := .Values.pipelines }}
{{- /* Key by key, not mergeOverwrite: that would ignore a pipeline's explicit 0 or false. */}}
{{- $merged := deepCopy $.Values.pipelineDefaults }}
{{- range $key, $value := $pipeline }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $merged $key)) }}
{{- $_ := set $merged $key (mustMergeOverwrite (deepCopy (get $merged $key)) (deepCopy $value)) }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $out $name $merged }}
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
{{- /* Same rule as jobtide_worker.topology.broker_consumer_timeout_ms: 60 s margin, never below 30 min. maxTaskSeconds may have a fraction. */}}
{{- max 1800000 (int64 (ceil (mulf (addf $longest 60) 1000))) }}
{{- end }}
{{- end }}
