{{/*
The scaler's configuration file (docs/architecture.md, "Scaler configuration file"), with each
pipeline's worker Job template fully rendered: broker variables from the Secret, the node pool
defaults, secure contexts and the pipeline's podTemplate merged over them.
*/}}
{{- define "jobtide.scaler.config" -}}
{{- $root := . }}
{{- $brokerEnv := include "jobtide.broker.env" . | fromYamlArray }}
{{- $pipelines := dict }}
{{- range $name, $p := (include "jobtide.pipelines" . | fromYaml) }}
{{- $labels := dict "app.kubernetes.io/name" "jobtide" "app.kubernetes.io/instance" $root.Release.Name "app.kubernetes.io/component" "worker" "app.kubernetes.io/managed-by" "jobtide-scaler" "jobtide.io/pipeline" $name }}
{{- $labels = mustMergeOverwrite (deepCopy ($root.Values.commonLabels | default dict)) $labels }}
{{- $podTemplate := $p.podTemplate | default dict }}
{{- $podMeta := $podTemplate.metadata | default dict }}
{{- $env := concat $brokerEnv (list (dict "name" "JOBTIDE_HANDLER" "value" $p.handler)) ($p.env | default list) }}
{{- $container := dict "name" "worker" "image" (include "jobtide.image" (dict "image" $p.image "root" $root)) "imagePullPolicy" $p.image.pullPolicy "env" $env "securityContext" $p.securityContext "volumeMounts" (concat (list (dict "name" "tmp" "mountPath" "/tmp")) ($p.extraVolumeMounts | default list)) }}
{{- with $p.resources }}{{ $_ := set $container "resources" . }}{{ end }}
{{- $podSpec := dict "restartPolicy" "Never" "automountServiceAccountToken" false "enableServiceLinks" false "securityContext" $p.podSecurityContext "containers" (list $container) "volumes" (concat (list (dict "name" "tmp" "emptyDir" (dict "sizeLimit" "1Gi"))) ($p.extraVolumes | default list)) }}
{{- with $root.Values.imagePullSecrets }}{{ $_ := set $podSpec "imagePullSecrets" . }}{{ end }}
{{- /* Node pool defaults, then the pipeline's own pod spec fields on top (the user owns them). */}}
{{- with $root.Values.nodePool.nodeSelector }}{{ $_ := set $podSpec "nodeSelector" . }}{{ end }}
{{- with $root.Values.nodePool.tolerations }}{{ $_ := set $podSpec "tolerations" . }}{{ end }}
{{- with $root.Values.nodePool.affinity }}{{ $_ := set $podSpec "affinity" . }}{{ end }}
{{- with $root.Values.nodePool.priorityClassName }}{{ $_ := set $podSpec "priorityClassName" . }}{{ end }}
{{- range $key, $value := ($podTemplate.spec | default dict) }}
{{- if eq $key "volumes" }}
{{- $_ := set $podSpec "volumes" (concat $podSpec.volumes $value) }}
{{- else }}
{{- $_ := set $podSpec $key $value }}
{{- end }}
{{- end }}
{{- $podLabels := mustMergeOverwrite (deepCopy ($podMeta.labels | default dict)) $labels }}
{{- $podAnnotations := mustMergeOverwrite (deepCopy ($root.Values.nodePool.podAnnotations | default dict)) ($podMeta.annotations | default dict) }}
{{- $jobTemplate := dict "metadata" (dict "labels" $labels "annotations" dict) "spec" (dict "template" (dict "metadata" (dict "labels" $podLabels "annotations" $podAnnotations) "spec" $podSpec)) }}
{{- $settings := dict "queue" $p.queue "jobTemplate" $jobTemplate }}
{{- range $key := include "jobtide.pipelineSettingKeys" $root | fromJsonArray }}
{{- $_ := set $settings $key (get $p $key) }}
{{- end }}
{{- $_ := set $pipelines $name $settings }}
{{- end }}
{{- $election := .Values.scaler.leaderElection }}
{{- $config := dict
  "namespace" .Release.Namespace
  "release" .Release.Name
  "leaderElection" (dict "enabled" $election.enabled "leaseName" (include "jobtide.scaler.fullname" .) "leaseDurationSeconds" (int64 $election.leaseDurationSeconds) "renewDeadlineSeconds" (int64 $election.renewDeadlineSeconds) "retryPeriodSeconds" (int64 $election.retryPeriodSeconds))
  "metrics" (dict "port" (int64 .Values.scaler.metrics.port))
  "pipelines" $pipelines }}
{{- range $key := include "jobtide.scalerSettingKeys" . | fromJsonArray }}
{{- $_ := set $config $key (get $root.Values.scaler $key) }}
{{- end }}
{{- toYaml $config }}
{{- end }}
