{{/*
A pipeline's worker Job template, which the scaler fills in for every worker it starts
(docs/architecture.md, "Scaler configuration file" and "Labels"). Each helper below takes
(dict "root" $ "pipeline" $mergedPipeline) and returns YAML.

Who owns what: the scaler adds the labels it selects Jobs by and the per-pipeline variables;
the chart renders everything else here, from the node pool defaults, the pipeline's values and
its pass-through `podTemplate`, which the user owns:
  - pod spec fields of `podTemplate.spec` replace the node pool's, except `securityContext`,
    which merges over `podSecurityContext` key by key (secure defaults stay unless overridden);
  - `podTemplate.spec.containers` are merged by name: the one named `worker` is merged with
    the generated worker container, whose fields win; others (sidecars) pass through;
  - every container, init containers included, gets `securityContext` merged the same way.
*/}}
{{- define "jobtide.worker.jobTemplate" -}}
{{- $podMetadata := .pipeline.podTemplate.metadata | default dict }}
{{- $appLabels := include "jobtide.appLabels" .root | fromYaml }}
metadata:
  labels:
    {{- toYaml $appLabels | nindent 4 }}
spec:
  template:
    metadata:
      labels:
        {{- include "jobtide.merge" (dict "base" $podMetadata.labels "over" $appLabels) | nindent 8 }}
      annotations:
        {{- include "jobtide.merge" (dict "base" .root.Values.nodePool.podAnnotations "over" $podMetadata.annotations) | nindent 8 }}
    spec:
      {{- include "jobtide.worker.podSpec" . | nindent 6 }}
{{- end }}

{{- define "jobtide.worker.podSpec" -}}
{{- $given := .pipeline.podTemplate.spec | default dict }}
{{- $spec := include "jobtide.worker.podDefaults" . | fromYaml }}
{{- range $key, $value := omit $given "containers" "initContainers" "securityContext" }}
{{- $_ := set $spec $key $value }}
{{- end }}
{{- $_ := set $spec "securityContext" (include "jobtide.merge" (dict "base" .pipeline.podSecurityContext "over" $given.securityContext) | fromYaml) }}
{{- $_ := set $spec "containers" (include "jobtide.worker.containers" . | fromYamlArray) }}
{{- with $given.initContainers }}
{{- $_ := set $spec "initContainers" (include "jobtide.worker.secured" (dict "containers" . "securityContext" $.pipeline.securityContext) | fromYamlArray) }}
{{- end }}
{{- toYaml $spec }}
{{- end }}

{{/* The pod spec before the pipeline's podTemplate.spec: jobtide's settings, then the node pool's. */}}
{{- define "jobtide.worker.podDefaults" -}}
{{- $pool := .root.Values.nodePool }}
restartPolicy: Never
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- if $pool.affinity }}
affinity:
  {{- toYaml $pool.affinity | nindent 2 }}
{{- else if $pool.packWorkers }}
{{- /* The default scheduler spreads pods over the least-allocated nodes, so the tail of a
burst would keep many nodes up for a few workers each; preferring nodes that already run a
worker of the release leaves the others empty for the node autoscaler to remove. */}}
affinity:
  podAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "jobtide.selectorLabels" (dict "root" .root "component" "worker") | nindent 14 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir: {sizeLimit: 1Gi}
  {{- include "jobtide.broker.credentialsVolume" .root | nindent 2 }}
  {{- if include "jobtide.broker.caMounted" .root }}
  {{- include "jobtide.broker.caVolume" .root | nindent 2 }}
  {{- end }}
  {{- with .pipeline.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The worker container's fields jobtide sets; they win over the same fields in podTemplate. */}}
{{- define "jobtide.worker.container" -}}
{{- $p := .pipeline }}
name: worker
image: {{ include "jobtide.image" (dict "image" $p.image "root" .root) | quote }}
imagePullPolicy: {{ $p.image.pullPolicy }}
env:
  {{- include "jobtide.broker.env" .root | trim | nindent 2 }}
  - name: {{ include "jobtide.env.HANDLER" .root }}
    value: {{ $p.handler | quote }}
  {{- with $p.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $p.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - {name: tmp, mountPath: /tmp}
  {{- include "jobtide.broker.credentialsVolumeMount" .root | nindent 2 }}
  {{- if include "jobtide.broker.caMounted" .root }}
  {{- include "jobtide.broker.caVolumeMount" .root | nindent 2 }}
  {{- end }}
  {{- with $p.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* podTemplate.spec.containers merged by name with the worker container (listed first when absent). */}}
{{- define "jobtide.worker.containers" -}}
{{- $worker := include "jobtide.worker.container" . | fromYaml }}
{{- $containers := list }}
{{- $listed := false }}
{{- range (.pipeline.podTemplate.spec | default dict).containers }}
{{- if eq .name $worker.name }}
{{- $listed = true }}
{{- $containers = append $containers (include "jobtide.merge" (dict "base" . "over" $worker) | fromYaml) }}
{{- else }}
{{- $containers = append $containers . }}
{{- end }}
{{- end }}
{{- if not $listed }}
{{- $containers = prepend $containers $worker }}
{{- end }}
{{- include "jobtide.worker.secured" (dict "containers" $containers "securityContext" .pipeline.securityContext) }}
{{- end }}

{{/* Containers with the secure defaults merged under each one's own securityContext. */}}
{{- define "jobtide.worker.secured" -}}
{{- $secured := list }}
{{- range .containers }}
{{- $context := include "jobtide.merge" (dict "base" $.securityContext "over" .securityContext) | fromYaml }}
{{- $secured = append $secured (set (deepCopy .) "securityContext" $context) }}
{{- end }}
{{- toYaml $secured }}
{{- end }}

{{/*
Why a pipeline's worker pod spec (as rendered) breaks the restricted Pod Security Standard, as
a YAML list of messages naming the field; empty when it meets it. A namespace enforcing that
level refuses every such pod, so the first Job of the pipeline would fail, not the install.
Checked after the merges above, on what the pod would really carry:
  include "jobtide.worker.restrictedProblems" (dict "name" $pipelineName "spec" $podSpec)
*/}}
{{- define "jobtide.worker.restrictedProblems" -}}
{{- $problems := list }}
{{- $spec := .spec }}
{{- $at := printf "pipelines.%s" .name }}
{{- $pod := $spec.securityContext | default dict }}
{{- range $field := list "hostNetwork" "hostPID" "hostIPC" }}
{{- if eq (toString (get $spec $field)) "true" }}
{{- $problems = append $problems (printf "%s.podTemplate.spec.%s must not be true" $at $field) }}
{{- end }}
{{- end }}
{{- $volumeTypes := list "configMap" "csi" "downwardAPI" "emptyDir" "ephemeral" "image" "persistentVolumeClaim" "projected" "secret" }}
{{- range $volume := $spec.volumes }}
{{- range $type := omit $volume "name" | keys | sortAlpha }}
{{- if not (has $type $volumeTypes) }}
{{- $problems = append $problems (printf "%s.extraVolumes: volume %q is a %s volume; allowed: %s" $at $volume.name $type (join ", " $volumeTypes)) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $list := list "initContainers" "containers" }}
{{- range $c := get $spec $list | default list }}
{{- $sc := $c.securityContext | default dict }}
{{- $where := printf "%s: %s %q securityContext" $at (trimSuffix "s" $list) $c.name }}
{{- if ne (toString $sc.allowPrivilegeEscalation) "false" }}
{{- $problems = append $problems (printf "%s.allowPrivilegeEscalation must be false" $where) }}
{{- end }}
{{- if eq (toString $sc.privileged) "true" }}
{{- $problems = append $problems (printf "%s.privileged must not be true" $where) }}
{{- end }}
{{- $caps := $sc.capabilities | default dict }}
{{- if not (has "ALL" ($caps.drop | default list)) }}
{{- $problems = append $problems (printf "%s.capabilities.drop must contain ALL" $where) }}
{{- end }}
{{- range $cap := $caps.add | default list }}
{{- if ne $cap "NET_BIND_SERVICE" }}
{{- $problems = append $problems (printf "%s.capabilities.add must not add %s (only NET_BIND_SERVICE)" $where $cap) }}
{{- end }}
{{- end }}
{{- $nonRoot := ternary $sc.runAsNonRoot $pod.runAsNonRoot (not (kindIs "invalid" $sc.runAsNonRoot)) }}
{{- if ne (toString $nonRoot) "true" }}
{{- $problems = append $problems (printf "%s.runAsNonRoot (or the pod's) must be true" $where) }}
{{- end }}
{{- $user := ternary $sc.runAsUser $pod.runAsUser (not (kindIs "invalid" $sc.runAsUser)) }}
{{- if and (not (kindIs "invalid" $user)) (eq (toString $user) "0") }}
{{- $problems = append $problems (printf "%s.runAsUser (or the pod's) must not be 0" $where) }}
{{- end }}
{{- $seccomp := ternary $sc.seccompProfile $pod.seccompProfile (not (kindIs "invalid" $sc.seccompProfile)) | default dict }}
{{- if not (has (toString $seccomp.type) (list "RuntimeDefault" "Localhost")) }}
{{- $problems = append $problems (printf "%s.seccompProfile.type (or the pod's) must be RuntimeDefault or Localhost" $where) }}
{{- end }}
{{- range $c.ports }}
{{- if .hostPort }}
{{- $problems = append $problems (printf "%s: %s %q must not use a hostPort" $at (trimSuffix "s" $list) $c.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $problems }}
{{- end }}
