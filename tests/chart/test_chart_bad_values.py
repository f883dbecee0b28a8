"""Each file under bad-values/ is a mistake a user could make. Its `# expect:` lines are what
`helm template` and `helm lint --strict` must fail with (the schema's or the chart's own rules,
naming the field); its `# expect-install:` lines, for mistakes only the cluster can see, what
the apiserver answers at `helm install` (test_chart_bad_values_install.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from chartlib import BAD_VALUES, expectations, template_args
from jobtide_testbed.tools import CHART, HELM_KUBE_VERSION, helm

pytestmark = pytest.mark.unit

RENDER_CHECKED = [path for path in BAD_VALUES if expectations(path)]
# Mistakes that `helm lint` cannot see, each file saying why on a `# lint: passes` line.
LINT_BLIND = [path for path in RENDER_CHECKED if "\n# lint: passes" in path.read_text()]
INSTALL_CHECKED = [path for path in BAD_VALUES if expectations(path, install=True)]


def test_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    assert len(RENDER_CHECKED) >= 60
    assert len(INSTALL_CHECKED) >= 5
    for path in BAD_VALUES:
        assert bool(expectations(path)) != bool(expectations(path, install=True)), (
            f"{path.name} needs '# expect:' or '# expect-install:' lines (one kind)"
        )


@pytest.mark.parametrize("binary", ["helm", "helm4"])
@pytest.mark.parametrize("values", RENDER_CHECKED, ids=lambda p: p.stem)
def test_bad_values_are_rejected_naming_the_field(values: Path, binary: str) -> None:
    result = helm(*template_args([values]), binary=binary, check=False, timeout=120)
    assert result.returncode != 0, f"{values.name} was accepted"
    for fragment in expectations(values):
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"


def lint(values: Path, binary: str) -> subprocess.CompletedProcess[str]:
    args = ["lint", "--strict", str(CHART), "-f", str(values), "--kube-version", HELM_KUBE_VERSION]
    return helm(*args, binary=binary, check=False, timeout=120)


@pytest.mark.parametrize("binary", ["helm", "helm4"])
@pytest.mark.parametrize(
    "values", [p for p in RENDER_CHECKED if p not in LINT_BLIND], ids=lambda p: p.stem
)
def test_helm_lint_strict_fails_on_bad_values(values: Path, binary: str) -> None:
    """`helm lint` turns `fail` into a log line; the chart's rules fail it all the same."""
    result = lint(values, binary)
    assert result.returncode != 0, f"helm lint --strict passed {values.name}"
    # Lint shows a message of the chart's rules quoted, as the name of a missing template.
    output = (result.stdout + result.stderr).replace('\\"', '"')
    for fragment in expectations(values):
        assert fragment in output, f"{fragment!r} not in:\n{output}"


@pytest.mark.parametrize("binary", ["helm", "helm4"])
@pytest.mark.parametrize("values", LINT_BLIND, ids=lambda p: p.stem)
def test_what_helm_lint_cannot_see_is_said_in_the_file(values: Path, binary: str) -> None:
    """If lint starts failing on one of these, drop its `# lint: passes` line."""
    assert lint(values, binary).returncode == 0


@pytest.mark.parametrize("values", INSTALL_CHECKED, ids=lambda p: p.stem)
def test_what_only_the_cluster_refuses_renders(values: Path) -> None:
    """These pass the schema and the chart's rules (the apiserver refuses them at install):
    if one starts failing here, the chart catches it earlier, so move it to `# expect:`."""
    result = helm(*template_args([values]), check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kind: PodTemplate" in result.stdout
