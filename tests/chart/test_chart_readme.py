"""Every value is documented with a `# --` comment and README.md's table is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from chartlib import CHART, REPO

pytestmark = pytest.mark.unit

GENERATOR = REPO / "ci" / "lib" / "helm_values_doc.py"


def test_readme_values_table_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), str(CHART), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generator_reports_undocumented_and_stale(tmp_path: Path) -> None:
    chart = tmp_path
    (chart / "values.yaml").write_text(
        "# -- Documented.\nsettled: 1\ngroup:\n  # -- Inner.\n  inner: true\nforgotten: x\n"
    )
    (chart / "README.md").write_text(
        "# x\n<!-- values-table:start -->\n<!-- values-table:end -->\n"
    )
    check = [sys.executable, str(GENERATOR), str(chart), "--check"]
    result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "group, forgotten" in result.stdout
    (chart / "values.yaml").write_text("# -- Documented.\nsettled: 1\n")
    result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "out of date" in result.stdout
    subprocess.run(check[:-1], check=True, timeout=60)
    assert "| settled | int | `1` | Documented. |" in (chart / "README.md").read_text()
    result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
