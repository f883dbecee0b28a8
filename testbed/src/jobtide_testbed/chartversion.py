"""The chart's version discipline, as chart-testing's `ct lint` checks it, without `ct`:

    python -m jobtide_testbed.chartversion [--ref REF] [--repo DIR]    (ci/chart-version-check)

Fails (exit 1, each problem on a line) when a file under charts/jobtide differs from the merge
base of REF and HEAD (committed, staged, unstaged or untracked) while Chart.yaml's version is
not greater than it was there, and when CHANGELOG.md has no entry for the current version
(what `jobtide_scaler.contracts` makes Chart.yaml's `artifacthub.io/changes` from). Exit 2 when
REF is not a commit of the repository."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from jobtide_scaler.contracts import CHART_CHANGELOG, CHART_METADATA, changelog_entry

CHART_DIR = str(Path(CHART_METADATA).parent)
DEFAULT_REF = "origin/main"
_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class RefError(Exception):
    pass


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Semantic Versioning 2.0 precedence: a pre-release sorts below its release; its
    identifiers compare numerically when numeric, else as text, numeric ones first."""
    match = _SEMVER.match(version)
    if match is None:
        raise ValueError(f"{CHART_METADATA}: version {version!r} is not a semantic version")
    major, minor, patch, pre = match.groups()
    parts: tuple[tuple[int, int | str], ...] = ()
    if pre:
        parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), 0 if pre else 1, parts


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise RefError(result.stderr.strip() or f"git {' '.join(args)} failed")
    return result.stdout


def changed_chart_files(repo: Path, base: str) -> list[str]:
    """Files under the chart that differ from `base`: committed since, staged, unstaged, or
    new and not ignored."""
    changed = _git(repo, "diff", "--name-only", base, "--", CHART_DIR).split()
    untracked = _git(repo, "ls-files", "--others", "--exclude-standard", "--", CHART_DIR).split()
    return sorted({*changed, *untracked})


def problems(repo: Path, ref: str) -> list[str]:
    try:
        _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RefError:
        raise RefError(f"{ref} is not a commit of {repo}") from None
    base = _git(repo, "merge-base", ref, "HEAD").strip()
    current = str(yaml.safe_load((repo / CHART_METADATA).read_text())["version"])
    found = []
    changed = changed_chart_files(repo, base)
    if changed:
        try:
            before_text = _git(repo, "show", f"{base}:{CHART_METADATA}")
        except RefError:
            before_text = ""  # the chart is new since the merge base
        before = str(yaml.safe_load(before_text)["version"]) if before_text else None
        if before is not None and semver_key(current) <= semver_key(before):
            found.append(
                f"{CHART_DIR} changed since {ref} ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}) but its version {current} is not "
                f"greater than {before}: bump `version` in {CHART_METADATA}"
            )
    try:
        changelog_entry((repo / CHART_CHANGELOG).read_text(), current)
    except (OSError, ValueError) as e:
        found.append(str(e))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ci/chart-version-check",
        description="Fail when the chart changed without a version bump, or its CHANGELOG.md "
        "has no entry for its version.",
    )
    parser.add_argument("--ref", default=DEFAULT_REF, help=f"compare with (default {DEFAULT_REF})")
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the repository's root")
    args = parser.parse_args(argv)
    try:
        found = problems(args.repo, args.ref)
    except RefError as e:
        print(f"chart-version-check: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        found = [str(e)]
    for problem in found:
        print(f"chart-version-check: {problem}", file=sys.stderr)
    if not found:
        print(f"chart-version-check: {CHART_DIR} version and changelog in order against {args.ref}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
