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
{{- range $key := list "messagesPerWorker" "minWorkers" "maxWorkers" "maxNewPerCycle" "activationMessages" "idleTimeoutSeconds" "maxAttempts" "maxTaskSeconds" "backoffLimit" "ttlSecondsAfterFinished" "failedJobsHistoryLimit" }}
{{- $_ := set $settings $key (int64 (get $p $key)) }}
{{- end }}
{{- $_ := set $pipelines $name $settings }}
{{- end }}
{{- $election := .Values.scaler.leaderElection }}
{{- $config := dict
  "namespace" .Release.Namespace
  "release" .Release.Name
  "pollIntervalSeconds" (int64 .Values.scaler.pollIntervalSeconds)
  "brokerStaleAfterSeconds" (int64 .Values.scaler.brokerStaleAfterSeconds)
  "maxTotalWorkers" (int64 .Values.scaler.maxTotalWorkers)
  "leaderElection" (dict "enabled" $election.enabled "leaseName" (include "jobtide.scaler.fullname" .) "leaseDurationSeconds" (int64 $election.leaseDurationSeconds) "renewDeadlineSeconds" (int64 $election.renewDeadlineSeconds) "retryPeriodSeconds" (int64 $election.retryPeriodSeconds))
  "metrics" (dict "port" (int64 .Values.scaler.metrics.port))
  "pipelines" $pipelines }}
{{- toYaml $config }}
{{- end }}
