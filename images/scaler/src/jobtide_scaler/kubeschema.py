"""The Kubernetes object shapes the chart's values pass through, for the chart's values schema.

Taken from the Kubernetes OpenAPI schemas that kubernetes-validate (PyPI, pinned in
ci/requirements-dev.txt) ships, strict variant (unknown fields rejected), for
`KUBERNETES_VERSION`. `python -m jobtide_scaler.contracts --write` copies them into
values.schema.json under `definitions`, named as Kubernetes names them
(`io.k8s.api.core.v1.Toleration`); the chart's own definitions refer to them.

What the copy changes, and why:
  - descriptions and `x-kubernetes-*` annotations are dropped (size; helm never shows them);
  - integers get the bounds of their format (int32, int64), and int64 ones at most 2^53 - 1:
    Helm reads values as float64, so a larger integer reaches the templates changed;
  - `Quantity` is the chart's `quantity` (a pattern; the OpenAPI says only "string or number");
  - a PodSpec needs no `containers`: the chart always adds the worker container.
Generating needs kubernetes-validate (a development dependency): the scaler never runs this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The newest Kubernetes the chart is validated against (tests/chart, VALIDATED_KUBE_VERSIONS):
# a field an older cluster does not know is refused at install by that cluster's apiserver.
KUBERNETES_VERSION = "1.35.0"
PREFIX = "io.k8s."
# The kinds values hold as they are; their definitions pull in the ones they use.
ROOTS = [
    f"io.k8s.api.core.v1.{kind}"
    for kind in (
        "PodSpec",
        "Container",
        "EnvVar",
        "Volume",
        "VolumeMount",
        "Toleration",
        "Affinity",
        "PodSecurityContext",
        "SecurityContext",
        "Probe",
        "LocalObjectReference",
    )
]
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
CHART_QUANTITY = "#/definitions/quantity"
# Helm keeps integers exactly only up to here (float64).
MAX_EXACT_INTEGER = 2**53 - 1
_BOUNDS = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER),
    None: (-(2**31), 2**31 - 1),  # int-or-string: ports and percentages, int32 in the API
}
_LOCAL = "#/$defs/"


def _source() -> Path:
    import kubernetes_validate  # type: ignore[import-untyped]  # development-only dependency

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return root / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [
            ref
            for key, value in node.items()
            for ref in ([value] if key == "$ref" else _refs(value))
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _is_integer(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "integer" or (isinstance(kind, list) and "integer" in kind)


def _adapted(node: Any) -> Any:
    if isinstance(node, list):
        return [_adapted(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-"):
            continue
        if key == "$ref":
            name = value.removeprefix(_LOCAL)
            out[key] = CHART_QUANTITY if name == QUANTITY else f"#/definitions/{name}"
        else:
            out[key] = _adapted(value)
    if _is_integer(out):
        low, high = _BOUNDS[out.get("format")]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    return out


def definitions() -> dict[str, Any]:
    """Name -> JSON schema of every definition the roots reach, adapted for the chart."""
    every: dict[str, Any] = json.loads(_source().read_text())["$defs"]
    reached: dict[str, Any] = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name in reached or name == QUANTITY:
            continue
        reached[name] = every[name]
        pending.extend(ref.removeprefix(_LOCAL) for ref in _refs(every[name]))
    adapted = {name: _adapted(reached[name]) for name in sorted(reached)}
    pod_spec = adapted["io.k8s.api.core.v1.PodSpec"]
    pod_spec["required"] = [key for key in pod_spec.get("required", []) if key != "containers"]
    if not pod_spec["required"]:
        del pod_spec["required"]
    return adapted
