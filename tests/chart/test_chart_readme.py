"""README.md is what helm-docs makes of README.md.gotmpl and the `# --` comments of values.yaml,
and every value in its table has a description."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from jobtide_testbed.tools import CHART, tool

pytestmark = pytest.mark.unit

# Also the command README.md.gotmpl tells contributors to run.
SORT = ["--sort-values-order", "file"]


def helm_docs(chart: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm-docs"), "--chart-search-root", str(chart), *SORT, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def generated_readme(chart: Path) -> str:
    """README.md as helm-docs would write it (--dry-run prints it instead)."""
    return helm_docs(chart, "--dry-run").stdout


def table_rows(readme: str) -> dict[str, list[str]]:
    """The values table: key -> [type, default, description]."""
    rows = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] not in ("Key", "-----"):
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_is_what_helm_docs_generates() -> None:
    readme = (CHART / "README.md").read_text()
    assert generated_readme(CHART).strip() == readme.strip(), (
        "charts/jobtide/README.md is out of date: run "
        "helm-docs --chart-search-root charts/jobtide --sort-values-order file"
    )


def test_every_value_in_the_table_has_a_description() -> None:
    rows = table_rows((CHART / "README.md").read_text())
    assert {"nameOverride", "scaler.replicas", "nodePool.podAnnotations"} <= rows.keys()
    assert [key for key, (_, _, description) in rows.items() if not description] == []


def test_an_undocumented_value_shows_up_without_a_description(tmp_path: Path) -> None:
    """The check above can fail: helm-docs lists a value without a comment, undescribed."""
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "README.md.gotmpl").write_text('{{ template "chart.valuesTable" . }}\n')
    (chart / "values.yaml").write_text(
        "# A group: plain comment, no row of its own.\ngroup:\n"
        "  # -- Documented.\n  settled: 1\n  forgotten: x\n"
    )
    rows = table_rows(generated_readme(chart))
    assert rows == {
        "group.settled": ["int", "`1`", "Documented."],
        "group.forgotten": ["string", '`"x"`', ""],
    }
