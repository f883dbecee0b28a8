{{/*
The scaler's configuration file (docs/architecture.md, "Scaler configuration file"), with each
pipeline's worker Job template fully rendered (_worker.tpl).
*/}}
{{- define "jobtide.scaler.config" -}}
{{- $root := . }}
{{- $pipelines := dict }}
{{- range $name, $p := (include "jobtide.pipelines" . | fromYaml) }}
{{- $jobTemplate := include "jobtide.worker.jobTemplate" (dict "root" $root "pipeline" $p) | fromYaml }}
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
  "ownerDeployment" (include "jobtide.scaler.fullname" .)
  "statusConfigMap" (include "jobtide.scaler.statusName" .)
  "leaderElection" (dict "enabled" $election.enabled "leaseName" (include "jobtide.scaler.fullname" .) "leaseDurationSeconds" (int64 $election.leaseDurationSeconds) "renewDeadlineSeconds" (int64 $election.renewDeadlineSeconds) "retryPeriodSeconds" (int64 $election.retryPeriodSeconds))
  "metrics" (dict "port" (int64 .Values.scaler.metrics.port))
  "pipelines" $pipelines }}
{{- range $key := include "jobtide.scalerSettingKeys" . | fromJsonArray }}
{{- $_ := set $config $key (get $root.Values.scaler $key) }}
{{- end }}
{{- toYaml $config }}
{{- end }}
