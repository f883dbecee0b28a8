"""Each file under bad-values/ is a mistake a user could make; `helm template` must reject it
with a message naming the field. The expected fragments are the file's `# expect:` lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from chartlib import template_args
from jobtide_testbed.tools import helm

pytestmark = pytest.mark.unit

BAD_VALUES = sorted((Path(__file__).parent / "bad-values").glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    prefix = "# expect: "
    lines = path.read_text().splitlines()
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def test_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    assert len(BAD_VALUES) >= 20
    for path in BAD_VALUES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("binary", ["helm", "helm4"])
@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.stem)
def test_bad_values_are_rejected_naming_the_field(values: Path, binary: str) -> None:
    result = helm(*template_args([values]), binary=binary, check=False, timeout=120)
    assert result.returncode != 0, f"{values.name} was accepted"
    for fragment in expectations(values):
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
