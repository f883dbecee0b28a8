"""Write offline Kubernetes JSON schemas in kubeconform's standalone layout.

kubernetes-validate (PyPI) ships one schema per kind whose `$ref`s point at a shared
`_definitions.json` identified by an https `$id`; kubeconform would try to fetch that URL.
This rewrites every kind into a self-contained file, carrying only the definitions it
reaches under a local `$defs`, at the path kubeconform expects:

    OUTDIR/v<version>-standalone[-strict]/<kind>[-<group>]-<version>.json

Usage: python ci/lib/kube_schemas.py OUTDIR [--versions 1.31.0 1.32.0 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]

DEFAULT_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0")
SHARED_PREFIX = "/api/_definitions.json#/$defs/"
LOCAL_PREFIX = "#/$defs/"


def iter_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def localize(node: Any) -> Any:
    """Points shared-file references at the copy of the definition inside the same file."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$id":
                continue
            if key == "$ref" and isinstance(value, str):
                out[key] = LOCAL_PREFIX + definition_name(value)
            else:
                out[key] = localize(value)
        return out
    if isinstance(node, list):
        return [localize(item) for item in node]
    return node


def definition_name(ref: str) -> str:
    for prefix in (SHARED_PREFIX, LOCAL_PREFIX):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    raise ValueError(f"unexpected $ref {ref!r}")


def reachable_definitions(root: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    needed: dict[str, Any] = {}
    pending = [definition_name(ref) for ref in iter_refs(root)]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed[name] = definitions[name]
        pending.extend(definition_name(ref) for ref in iter_refs(definitions[name]))
    return needed


def standalone(kind_schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = localize(kind_schema)
    needed = reachable_definitions(kind_schema, definitions)
    if needed:
        result["$defs"] = {name: localize(body) for name, body in sorted(needed.items())}
    return result


def write_version(source_root: Path, out_dir: Path, version: str, strict: bool) -> int:
    suffix = "-strict" if strict else ""
    source = source_root / f"v{version}-local{suffix}"
    if not source.is_dir():
        raise SystemExit(f"kubernetes-validate has no schemas for Kubernetes {version}")
    target = out_dir / f"v{version}-standalone{suffix}"
    target.mkdir(parents=True, exist_ok=True)
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    written = 0
    for path in sorted(source.glob("*.json")):
        if path.name in ("_definitions.json", "all.json"):
            continue
        schema = json.loads(path.read_text())
        # Only top-level kinds are looked up by kubeconform; the rest are fragments.
        if "x-kubernetes-group-version-kind" not in schema:
            continue
        (target / path.name).write_text(json.dumps(standalone(schema, definitions)))
        written += 1
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS))
    args = parser.parse_args(argv)
    source_root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    for version in args.versions:
        for strict in (False, True):
            count = write_version(source_root, args.out_dir, version, strict)
            print(f"kube_schemas: {count} kinds for v{version}{' strict' if strict else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
