"""The values schema as a whole: the Kubernetes shapes in it are the generated ones, every
number has bounds, and every Kubernetes object a value passes through is checked field by
field (jobtide_scaler.kubeschema)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from chartlib import CHART, VALIDATED_KUBE_VERSIONS
from jobtide_scaler import kubeschema

pytestmark = pytest.mark.unit

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())


def nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from nodes(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nodes(value, f"{path}/{index}")


def kinds(node: dict[str, Any]) -> set[str]:
    """The JSON types a schema node allows (none for a `properties` map with a `type` key)."""
    kind = node.get("type", [])
    if isinstance(kind, str):
        return {kind}
    return set(kind) if isinstance(kind, list) else set()


def test_every_number_has_a_maximum_that_helm_keeps_exactly() -> None:
    """Helm reads values as float64: an unbounded integer may wrap or lose digits later."""
    numbers = [
        (p, n) for p, n in nodes(SCHEMA) if isinstance(n, dict) and kinds(n) & {"integer", "number"}
    ]
    assert len(numbers) > 50
    for path, node in numbers:
        assert "maximum" in node, path
        assert node["maximum"] <= kubeschema.MAX_EXACT_INTEGER, path


def test_every_reference_resolves() -> None:
    definitions = SCHEMA["definitions"]
    refs = {n["$ref"] for _, n in nodes(SCHEMA) if isinstance(n, dict) and "$ref" in n}
    assert refs
    for ref in refs:
        assert ref.startswith("#/definitions/"), ref
        assert ref.removeprefix("#/definitions/") in definitions, ref


def test_kubernetes_objects_are_checked_field_by_field() -> None:
    """Every generated object shape refuses unknown fields, and the values that hold such
    objects refer to them, not to a bare `type: object`."""
    generated = {k: v for k, v in SCHEMA["definitions"].items() if k.startswith(kubeschema.PREFIX)}
    assert set(kubeschema.ROOTS) <= set(generated)
    for name, definition in generated.items():
        if "properties" in definition:
            assert definition.get("additionalProperties") is False, name
    open_objects = [
        path
        for path, node in nodes(SCHEMA["properties"])
        if isinstance(node, dict)
        and node.get("type") == "object"
        and not ({"properties", "additionalProperties", "patternProperties", "$ref"} & node.keys())
    ]
    assert open_objects == ["/global"]  # Helm's own, for subcharts


def test_the_pinned_kubernetes_version_is_one_the_chart_is_validated_against() -> None:
    newest = max(VALIDATED_KUBE_VERSIONS, key=lambda v: tuple(int(n) for n in v.split(".")))
    assert newest == kubeschema.KUBERNETES_VERSION
