"""`python -m jobtide_scaler annotate`'s arguments (the chart's pre-delete hook runs it; what it
may do against a real apiserver is tested in tests/chart/test_chart_install.py)."""

from __future__ import annotations

import pytest
from jobtide_scaler.__main__ import main
from jobtide_scaler.annotate import EXIT_USAGE, split_annotation

pytestmark = pytest.mark.unit


def test_annotation_is_split_at_the_first_equals_sign() -> None:
    assert split_annotation("jobtide.io/uninstalling=true") == ("jobtide.io/uninstalling", "true")
    assert split_annotation("a=b=c") == ("a", "b=c")
    assert split_annotation("a=") == ("a", "")


@pytest.mark.parametrize("text", ["jobtide.io/uninstalling", "=true", ""])
def test_an_annotation_without_key_or_value_is_refused_before_any_request(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["annotate", "-n", "jobs", text, "jobs-jobtide-rabbitmq-0"]) == EXIT_USAGE
    assert f"annotation {text!r}: expected KEY=VALUE" in capsys.readouterr().err


def test_namespace_and_a_pod_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["annotate", "jobtide.io/uninstalling=true"])
    assert exited.value.code == 2
    assert "--namespace" in capsys.readouterr().err
