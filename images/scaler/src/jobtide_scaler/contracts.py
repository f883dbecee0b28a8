"""The files generated from the contracts' single definitions, and the command that writes them:

    python -m jobtide_scaler.contracts --write [--repo DIR]   # regenerate
    python -m jobtide_scaler.contracts --check [--repo DIR]   # exit 1 naming stale files

From the settings (`jobtide_worker.pipeline_settings.PipelineSettings`,
`jobtide_scaler.settings.ScalerSettings`): their blocks in the scaler's configuration schema,
in the chart's values schema and in the chart's values.yaml (defaults and `# --` comments),
and the list of setting keys the chart copies into the scaler's configuration. From the names of
the environment variables (`jobtide_worker.config.Variable`): the chart's templates that name
them. From the Kubernetes OpenAPI schemas (`jobtide_scaler.kubeschema`): the shapes of the
Kubernetes objects values pass through, in the chart's values schema. From the queue
topology (`jobtide_worker.topology`): the chart's per-pipeline broker definitions, as a JSON
skeleton whose placeholders the chart fills in for each pipeline (Helm cannot run Python). From
the chart's CHANGELOG.md, values.yaml's image defaults and the scaler's license: Chart.yaml's
Artifact Hub annotations.

Only the generated parts of a file are replaced; the rest of it stays as written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jobtide_worker import topology
from jobtide_worker.config import HOST_PATTERN, Variable
from jobtide_worker.pipeline_settings import PipelineSettings, SettingSpec, setting_specs

from jobtide_scaler import kubeschema
from jobtide_scaler.jobs import job_labels
from jobtide_scaler.settings import ScalerSettings

COMMAND = "python -m jobtide_scaler.contracts --write"
SCALER_SCHEMA = "images/scaler/src/jobtide_scaler/config.schema.json"
CHART_SCHEMA = "charts/jobtide/values.schema.json"
CHART_VALUES = "charts/jobtide/values.yaml"
CHART_SETTING_KEYS = "charts/jobtide/templates/_setting-keys.tpl"
CHART_ENV_NAMES = "charts/jobtide/templates/_env-names.tpl"
CHART_TOPOLOGY = "charts/jobtide/files/queue-topology.json"
CHART_METADATA = "charts/jobtide/Chart.yaml"
CHART_CHANGELOG = "charts/jobtide/CHANGELOG.md"
SCALER_PROJECT = "images/scaler/pyproject.toml"

# Placeholders of the topology skeleton, replaced by the chart (rabbitmq-configmap.yaml). The
# queue's stands for a name with a regex-special character, so that its escaped form (in
# policy patterns) differs from it and gets its own placeholder.
_QUEUE_SAMPLE = "queue.sample"
_MAX_ATTEMPTS_SAMPLE = 987654321
# maxTaskSeconds whose consumer timeout (ms) is a number no other field has.
_MAX_TASK_SECONDS_SAMPLE = 876543.21
_CONSUMER_TIMEOUT_MS_SAMPLE = topology.consumer_timeout_ms(_MAX_TASK_SECONDS_SAMPLE)
_VHOST_SAMPLE = "vhost.sample"
QUEUE = "__QUEUE__"
QUEUE_PATTERN = "__QUEUE_PATTERN__"
MAX_ATTEMPTS = "__MAX_ATTEMPTS__"
CONSUMER_TIMEOUT_MS = "__CONSUMER_TIMEOUT_MS__"
VHOST = "__VHOST__"

_LINE_WIDTH = 100


def pipeline_specs() -> list[SettingSpec]:
    return list(setting_specs(PipelineSettings).values())


def scaler_specs() -> list[SettingSpec]:
    return list(setting_specs(ScalerSettings).values())


def _properties(specs: Iterable[SettingSpec]) -> dict[str, Any]:
    return {spec.key: spec.json_schema() for spec in specs}


def _json_text(document: Any) -> str:
    return json.dumps(document, indent=2) + "\n"


def scaler_schema(current: str) -> str:
    schema = json.loads(current)
    schema["properties"].update(_properties(scaler_specs()))
    schema["$defs"]["pipeline"]["properties"].update(_properties(pipeline_specs()))
    return _json_text(schema)


# The label keys the chart's templates set on the objects they render (_helpers.tpl,
# "jobtide.labels"); tests/chart checks that every rendered object has no other chart label.
CHART_LABEL_KEYS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


def reserved_label_keys() -> list[str]:
    """Label keys the chart or the scaler sets: a user's label of the same key would be
    overwritten without a word, so the schema refuses it."""
    return sorted({*CHART_LABEL_KEYS, *job_labels("release", "pipeline")})


def chart_schema(current: str) -> str:
    schema = json.loads(current)
    schema["properties"]["scaler"]["properties"].update(_properties(scaler_specs()))
    pipeline = _properties(pipeline_specs())
    schema["properties"]["pipelineDefaults"]["properties"].update(pipeline)
    schema["definitions"]["pipeline"]["properties"].update(pipeline)
    # As properties, not propertyNames: helm's validator then names the label in its message.
    schema["definitions"]["userLabels"]["properties"] = {
        key: {"not": {}, "description": "set by the chart or the scaler"}
        for key in reserved_label_keys()
    }
    external = schema["properties"]["externalBroker"]["properties"]
    # Empty: the release runs its own broker; the name checked is the host.
    external["host"]["pattern"] = f"^$|{HOST_PATTERN}"
    external["tls"]["properties"]["serverName"]["pattern"] = f"^$|{HOST_PATTERN}"
    ours = {k: v for k, v in schema["definitions"].items() if not k.startswith(kubeschema.PREFIX)}
    schema["definitions"] = {**ours, **kubeschema.definitions()}
    return _json_text(schema)


def _yaml_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _documented_lines(spec: SettingSpec, indent: str) -> list[str]:
    comment = textwrap.wrap(
        spec.doc,
        width=_LINE_WIDTH - len(indent),
        initial_indent="# -- ",
        subsequent_indent="# ",
        break_on_hyphens=False,
    )
    return [f"{indent}{line}" for line in comment] + [
        f"{indent}{spec.key}: {_yaml_number(spec.default)}"
    ]


def _replace_settings(lines: list[str], section: str, specs: list[SettingSpec]) -> list[str]:
    """Replace the settings of the top-level `section`, which stand together, by their
    generated lines; the section's other keys stay as written."""
    indent = "  "
    try:
        start_of_section = lines.index(f"{section}:")
    except ValueError:
        raise ValueError(f"{CHART_VALUES}: no top-level {section}: section") from None
    key_lines = {}
    for number in range(start_of_section + 1, len(lines)):
        line = lines[number]
        if line and not line.startswith((" ", "#")):
            break  # the next top-level key
        if match := re.match(rf"^{indent}([A-Za-z0-9_]+):", line):
            key_lines[match.group(1)] = number
    keys = [spec.key for spec in specs]
    missing = [key for key in keys if key not in key_lines]
    if missing:
        raise ValueError(f"{CHART_VALUES}: {section}.{missing[0]} is missing")
    first, last = key_lines[keys[0]], key_lines[keys[-1]]
    between = sorted(key for key, number in key_lines.items() if first <= number <= last)
    if between != sorted(keys):
        raise ValueError(
            f"{CHART_VALUES}: the keys {', '.join(keys)} of {section} must stand together, "
            f"in this order"
        )
    while first > 0 and lines[first - 1].startswith(f"{indent}#"):
        first -= 1  # the key's comment
    generated = [line for spec in specs for line in _documented_lines(spec, indent)]
    return [*lines[:first], *generated, *lines[last + 1 :]]


def chart_values(current: str) -> str:
    lines = current.splitlines()
    lines = _replace_settings(lines, "scaler", scaler_specs())
    lines = _replace_settings(lines, "pipelineDefaults", pipeline_specs())
    return "\n".join(lines) + "\n"


def chart_setting_keys() -> str:
    def define(name: str, specs: list[SettingSpec]) -> str:
        keys = json.dumps([spec.key for spec in specs])
        return f'{{{{- define "{name}" -}}}}\n{keys}\n{{{{- end }}}}\n'

    return (
        f"{{{{- /*\nGenerated by `{COMMAND}` from jobtide_worker.pipeline_settings and\n"
        f"jobtide_scaler.settings: do not edit. The setting keys (JSON lists) that the chart\n"
        f"copies into the scaler's configuration.\n*/}}}}\n"
        + define("jobtide.pipelineSettingKeys", pipeline_specs())
        + define("jobtide.scalerSettingKeys", scaler_specs())
    )


def variable_names() -> dict[str, str]:
    """The environment variables' names by attribute of `Variable`, in its order."""
    return {attribute: name for attribute, name in vars(Variable).items() if attribute.isupper()}


def chart_env_names() -> str:
    defines = "".join(
        f'{{{{- define "jobtide.env.{attribute}" -}}}}{name}{{{{- end }}}}\n'
        for attribute, name in variable_names().items()
    )
    return (
        f"{{{{- /*\nGenerated by `{COMMAND}` from jobtide_worker.config.Variable:\n"
        f"do not edit. The names of the environment variables that the worker and the scaler\n"
        f"read, one template each, by which the chart names those it sets:\n"
        f'include "jobtide.env.BROKER_HOST" . (a name that is not here fails the render).\n'
        f"*/}}}}\n" + defines
    )


def _placeholders(value: Any) -> Any:
    """The samples of a topology object replaced by the chart's placeholders."""
    if isinstance(value, dict):
        return {key: _placeholders(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_placeholders(item) for item in value]
    if value == _MAX_ATTEMPTS_SAMPLE:
        return MAX_ATTEMPTS
    if value == _CONSUMER_TIMEOUT_MS_SAMPLE:
        return CONSUMER_TIMEOUT_MS
    if isinstance(value, str):
        escaped = topology.regex_escape(_QUEUE_SAMPLE)
        return (
            value.replace(escaped, QUEUE_PATTERN)
            .replace(_QUEUE_SAMPLE, QUEUE)
            .replace(_VHOST_SAMPLE, VHOST)
        )
    return value


def chart_topology() -> str:
    """`shared`: the definitions every release has; `perPipeline`: those of one pipeline,
    with placeholders for its queue, the queue's regex-escaped name, its maxAttempts, the
    consumer timeout of its maxTaskSeconds and the vhost; `groupSizeArgument`: the queue
    argument the chart adds to every queue of a broker of several members."""
    shared = topology.definitions([], _VHOST_SAMPLE)
    sample = (_QUEUE_SAMPLE, _MAX_ATTEMPTS_SAMPLE, _MAX_TASK_SECONDS_SAMPLE)
    one = topology.definitions([sample], _VHOST_SAMPLE)
    per_pipeline = {
        kind: [item for item in items if item not in shared[kind]] for kind, items in one.items()
    }
    document = {
        "_comment": f"Generated by `{COMMAND}` from jobtide_worker.topology: do not edit.",
        "shared": _placeholders(shared),
        "perPipeline": _placeholders(per_pipeline),
        "groupSizeArgument": topology.GROUP_SIZE_ARGUMENT,
    }
    return _json_text(document)


# Artifact Hub's kinds of change, as CHANGELOG.md's `### ` headings name them.
CHANGE_KINDS = ("added", "changed", "deprecated", "removed", "fixed", "security")
_ANNOTATIONS = "annotations:"
_ANNOTATIONS_NOTE = (
    f"# Generated by `{COMMAND}`: do not edit. From CHANGELOG.md\n"
    "# (this version's entry), values.yaml's image defaults with appVersion, and the license\n"
    "# of images/scaler.\n"
)


def changelog_entry(changelog: str, version: str) -> list[dict[str, str]]:
    """The changes of `version` in CHANGELOG.md, as Artifact Hub's `artifacthub.io/changes`
    lists them; ValueError when the file has no entry for it."""
    entry: list[dict[str, str]] | None = None
    kind = ""
    for line in changelog.splitlines():
        if line.startswith("## "):
            if entry is not None:
                break
            if line[3:].strip() == version:
                entry = []
        elif entry is not None and line.startswith("### "):
            kind = line[4:].strip().lower()
            if kind not in CHANGE_KINDS:
                raise ValueError(f"{CHART_CHANGELOG}: unknown kind of change '{line[4:]}'")
        elif entry is not None and line.startswith("- "):
            if not kind:
                raise ValueError(f"{CHART_CHANGELOG}: a change of {version} under no kind")
            entry.append({"kind": kind, "description": line[2:].strip()})
    if not entry:
        raise ValueError(f"{CHART_CHANGELOG}: no entry for the chart's version {version}")
    return entry


def chart_images(values: Any, app_version: str) -> list[dict[str, str]]:
    """Every `image: {repository, tag}` default of values.yaml, a tag left empty meaning the
    chart's appVersion (as `jobtide.image` renders it), named by the repository's last part."""
    found = []
    if isinstance(values, dict):
        image = values.get("image")
        if isinstance(image, dict) and "repository" in image:
            repository = image["repository"]
            found.append({
                "name": repository.rsplit("/", 1)[-1],
                "image": f"{repository}:{image.get('tag') or app_version}",
            })  # fmt: skip
        for key, value in values.items():
            if key != "image":
                found += chart_images(value, app_version)
    return found


def _block(document: Any) -> str:
    text = yaml.safe_dump(document, sort_keys=False, width=_LINE_WIDTH - 4)
    return "".join(f"    {line}\n" for line in text.splitlines())


def chart_metadata(current: str, repo: Path) -> str:
    """Chart.yaml with its `annotations:` (its last key) made from their single sources."""
    chart = yaml.safe_load(current)
    values = yaml.safe_load((repo / CHART_VALUES).read_text())
    changes = changelog_entry((repo / CHART_CHANGELOG).read_text(), str(chart["version"]))
    project = tomllib.loads((repo / SCALER_PROJECT).read_text())["project"]
    head = current.split(f"\n{_ANNOTATIONS}", 1)[0].rstrip("\n") + "\n"
    head = head.removesuffix(_ANNOTATIONS_NOTE)
    return (
        head
        + _ANNOTATIONS_NOTE
        + f"{_ANNOTATIONS}\n"
        + f"  artifacthub.io/license: {project['license']}\n"
        + "  artifacthub.io/images: |\n"
        + _block(chart_images(values, str(chart["appVersion"])))
        + "  artifacthub.io/changes: |\n"
        + _block(changes)
    )


# Generated file (relative to the repository) -> its content, made from the current content
# (and, for some, from other files of the repository).
GENERATORS: dict[str, Callable[[str, Path], str]] = {
    SCALER_SCHEMA: lambda current, _repo: scaler_schema(current),
    CHART_SCHEMA: lambda current, _repo: chart_schema(current),
    CHART_VALUES: lambda current, _repo: chart_values(current),
    CHART_SETTING_KEYS: lambda _current, _repo: chart_setting_keys(),
    CHART_ENV_NAMES: lambda _current, _repo: chart_env_names(),
    CHART_TOPOLOGY: lambda _current, _repo: chart_topology(),
    CHART_METADATA: chart_metadata,
}


def expected_files(repo: Path) -> dict[str, str]:
    """Each generated file's path (relative to `repo`) and the content it should have."""
    expected = {}
    for path, generate in GENERATORS.items():
        file = repo / path
        expected[path] = generate(file.read_text() if file.exists() else "", repo)
    return expected


def stale_files(repo: Path) -> list[str]:
    return [
        path
        for path, content in expected_files(repo).items()
        if not (repo / path).exists() or (repo / path).read_text() != content
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobtide_scaler.contracts", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the files")
    action.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the repository's root")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files(args.repo)
            for path in stale:
                print(f"{path} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1 if stale else 0
        for path, content in expected_files(args.repo).items():
            file = args.repo / path
            if not file.exists() or file.read_text() != content:
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_text(content)
                print(f"wrote {path}")
    except (OSError, ValueError, KeyError) as e:
        print(f"contracts: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
