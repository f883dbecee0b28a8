"""Generate the values table of a chart's README.md from the `# --` comments of values.yaml.

The helm-docs convention: a `# -- text` comment (continued by further `#` lines) documents the
key below it. Keys nested in a documented value without comments of their own are part of that
value (raw Kubernetes objects such as resources or security contexts). Every other key must be
documented: an undocumented key is an error.

    python ci/lib/helm_values_doc.py CHART_DIR           # rewrite the table in README.md
    python ci/lib/helm_values_doc.py CHART_DIR --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

START = "<!-- values-table:start -->"
END = "<!-- values-table:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
DOC_START = re.compile(r"^ *# -- ?(?P<text>.*)$")
DOC_MORE = re.compile(r"^ *# ?(?P<text>.*)$")


@dataclass(frozen=True)
class Documented:
    path: tuple[str, ...]
    description: str


def parse(values_text: str) -> tuple[list[Documented], list[str]]:
    """The documented keys in file order, and the dotted paths of undocumented ones."""
    documented: list[Documented] = []
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, has its own doc)
    pending: list[str] | None = None
    for line in values_text.splitlines():
        start = DOC_START.match(line)
        if start:
            pending = [start.group("text").strip()]
            continue
        if pending is not None and (more := DOC_MORE.match(line)):
            pending.append(more.group("text").strip())
            continue
        key_line = KEY_LINE.match(line)
        if not key_line:
            if line.strip() and not line.lstrip().startswith("#"):
                pending = None
            continue
        indent = len(key_line.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k, _ in stack), key_line.group("key"))
        inside_raw_value = any(
            has_doc and not _has_documented_child(documented, path[: i + 1])
            for i, (_, _, has_doc) in enumerate(stack)
        )
        if pending is not None:
            documented.append(Documented(path, " ".join(t for t in pending if t)))
        elif not inside_raw_value:
            undocumented.append(".".join(path))
        stack.append((indent, key_line.group("key"), pending is not None))
        pending = None
    return documented, undocumented


def _has_documented_child(documented: list[Documented], prefix: tuple[str, ...]) -> bool:
    return any(len(d.path) > len(prefix) and d.path[: len(prefix)] == prefix for d in documented)


def _lookup(values: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def _type_name(value: Any) -> str:
    for python_type, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string")):
        if isinstance(value, python_type):
            return name
    return "list" if isinstance(value, list) else "object"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(values_text: str) -> str:
    documented, _ = parse(values_text)
    values = yaml.safe_load(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for entry in documented:
        if _has_documented_child(documented, entry.path):
            continue  # a group: its keys have rows of their own
        value = _lookup(values, entry.path)
        default = json.dumps(value, separators=(", ", ": "))
        rows.append(
            f"| {_cell('.'.join(entry.path))} | {_type_name(value)} | `{_cell(default)}` "
            f"| {_cell(entry.description)} |"
        )
    return "\n".join(rows) + "\n"


def updated_readme(readme: str, values_text: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}{END}{tail}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args(argv)
    values_text = (args.chart / "values.yaml").read_text()
    _, undocumented = parse(values_text)
    if undocumented:
        print("values.yaml keys without a `# --` comment: " + ", ".join(undocumented))
        return 1
    readme_path = args.chart / "README.md"
    readme = readme_path.read_text()
    wanted = updated_readme(readme, values_text)
    if wanted == readme:
        return 0
    if args.check:
        print(f"{readme_path} is out of date: run python ci/lib/helm_values_doc.py {args.chart}")
        return 1
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
