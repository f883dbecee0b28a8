"""ci/chart-version-check (jobtide_testbed.chartversion) on throw-away git repositories: a
chart change without a version bump fails, with one passes, a missing CHANGELOG entry fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from jobtide_testbed.chartversion import main, semver_key

pytestmark = pytest.mark.unit

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}  # fmt: skip


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60,
        env={**os.environ, **GIT_ENV},
    )  # fmt: skip


def write_chart(repo: Path, version: str, changelog_versions: list[str]) -> None:
    chart = repo / "charts" / "jobtide"
    (chart / "templates").mkdir(parents=True, exist_ok=True)
    (chart / "Chart.yaml").write_text(f"apiVersion: v2\nname: jobtide\nversion: {version}\n")
    entries = "".join(f"## {v}\n\n### Added\n- something in {v}\n\n" for v in changelog_versions)
    (chart / "CHANGELOG.md").write_text(f"# Changelog\n\n{entries}")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose `main` has chart 0.1.0, and a branch `work` checked out from it."""
    git(tmp_path, "init", "-q", "-b", "main")
    write_chart(tmp_path, "0.1.0", ["0.1.0"])
    (tmp_path / "charts" / "jobtide" / "templates" / "a.yaml").write_text("kind: ConfigMap\n")
    (tmp_path / "README.md").write_text("hello\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "chart 0.1.0")
    git(tmp_path, "checkout", "-q", "-b", "work")
    return tmp_path


def check(repo: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--repo", str(repo), "--ref", "main"])
    return code, capsys.readouterr().err


def test_a_chart_change_without_a_version_bump_fails(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = repo / "charts" / "jobtide" / "templates" / "a.yaml"
    template.write_text("kind: ConfigMap\nmetadata: {name: changed}\n")
    code, err = check(repo, capsys)
    assert code == 1
    assert "charts/jobtide changed since main (charts/jobtide/templates/a.yaml)" in err
    assert "version 0.1.0 is not greater than 0.1.0" in err
    # Committed, or a new file never added: the same.
    git(repo, "commit", "-q", "-am", "change the template")
    assert check(repo, capsys)[0] == 1
    git(repo, "reset", "-q", "--hard", "main")
    (repo / "charts" / "jobtide" / "templates" / "new.yaml").write_text("kind: Secret\n")
    code, err = check(repo, capsys)
    assert code == 1
    assert "templates/new.yaml" in err


def test_a_bumped_version_with_its_changelog_entry_passes(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "charts" / "jobtide" / "templates" / "a.yaml").write_text("kind: Secret\n")
    write_chart(repo, "0.2.0", ["0.2.0", "0.1.0"])
    git(repo, "commit", "-q", "-am", "chart 0.2.0")
    code, err = check(repo, capsys)
    assert (code, err) == (0, "")
    # main moves on meanwhile: the merge base, not main's tip, is what the bump is against.
    git(repo, "checkout", "-q", "main")
    (repo / "README.md").write_text("elsewhere\n")
    git(repo, "commit", "-q", "-am", "unrelated")
    git(repo, "checkout", "-q", "work")
    assert check(repo, capsys)[0] == 0


def test_a_version_without_a_changelog_entry_fails(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_chart(repo, "0.2.0", ["0.1.0"])
    code, err = check(repo, capsys)
    assert code == 1
    assert "no entry for the chart's version 0.2.0" in err
    assert "not greater" not in err


def test_changes_outside_the_chart_need_no_bump_and_a_version_may_not_go_back(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "README.md").write_text("changed\n")
    assert check(repo, capsys) == (0, "")
    write_chart(repo, "0.1.0-rc.1", ["0.1.0-rc.1", "0.1.0"])
    code, err = check(repo, capsys)
    assert code == 1
    assert "0.1.0-rc.1 is not greater than 0.1.0" in err


def test_an_unknown_ref_is_a_usage_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--repo", str(repo), "--ref", "origin/main"]) == 2
    assert "origin/main is not a commit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("0.1.0", "0.2.0"), ("0.9.0", "0.10.0"), ("1.0.0-rc.1", "1.0.0"),
     ("1.0.0-rc.2", "1.0.0-rc.10"), ("1.0.0-alpha", "1.0.0-beta"), ("1.0.0-1", "1.0.0-alpha"),
     ("1.2.3", "2.0.0")],
)  # fmt: skip
def test_semantic_version_precedence(lower: str, higher: str) -> None:
    assert semver_key(lower) < semver_key(higher)
