"""Where the test bed finds things, and the one way it gets what is missing.

Every binary the test bed runs is found by `tool(NAME)`; a tool that is not there yet is
installed by its set-up stage (`ci/setup STAGE`, under the set-up lock) on first use, so a
run of the unit tier never builds Kubernetes and a broker test never installs Docker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from jobtide_testbed.process import run

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("JOBTIDE_CACHE", Path.home() / ".cache" / "jobtide"))
BIN = CACHE / "bin" / "current"
SETUP = REPO / "ci" / "setup"
CHART = REPO / "charts" / "jobtide"
# For offline `helm template`/`lint`: helm built from Go modules defaults to a Kubernetes
# older than the chart's kubeVersion.
HELM_KUBE_VERSION = "1.34.0"
# Set by ci/setup for the commands it runs itself: the set-up in progress installs
# everything they need (and holds the lock a nested `ci/setup STAGE` would wait for).
SETUP_RUNNING_ENV = "JOBTIDE_SETUP_RUNNING"

# The set-up stage that provides each tool (ci/setup's stage names).
STAGE_OF_TOOL = {
    **dict.fromkeys(("helm", "helm3", "helm4", "kubeconform", "helm-docs"), "helm"),
    **dict.fromkeys(
        (
            "etcd",
            "kwok",
            "kubectl",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ),
        "kube",
    ),
    **dict.fromkeys(("kubelet", "kube-proxy", "coredns", "karpenter-kwok"), "node"),
    "promtool": "promtool",
    "kube-score": "kube-score",
    "registry": "registry",
    "kube-router": "kube-router",
}

_ready_stages: set[str] = set()


def ensure_stage(stage: str) -> None:
    """Install set-up stage `stage` (`ci/setup STAGE`) unless this process already did;
    quick when the machine has it. Its progress is shown only when it fails."""
    if stage in _ready_stages or os.environ.get(SETUP_RUNNING_ENV):
        return
    # A cold stage builds from source (Kubernetes: 10-20 minutes on 2 cores).
    run([str(SETUP), stage], timeout=3600)
    _ready_stages.add(stage)


def tool(name: str) -> str:
    """The path of one of the test bed's tools, installing its set-up stage when missing."""
    path = BIN / name
    if not path.exists():
        ensure_stage(STAGE_OF_TOOL[name])
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing after `ci/setup {STAGE_OF_TOOL[name]}`")
    return str(path)


def kubectl(
    kubeconfig: Path,
    *args: str,
    check: bool = True,
    stdin: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """kubectl against `kubeconfig`; raises with the output when it fails and `check`."""
    argv = [tool("kubectl"), "--kubeconfig", str(kubeconfig), *args]
    return run(argv, check=check, stdin=stdin, timeout=timeout)


def helm(
    *args: str,
    kubeconfig: Path | None = None,
    namespace: str | None = None,
    binary: str = "helm3",
    check: bool = True,
    timeout: float = 600,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """helm (`binary`: helm3 or helm4), against `kubeconfig` and `namespace` when given, with
    `stdin` as its input (a password for `--password-stdin`); raises with the output when it
    fails and `check`."""
    argv = [tool(binary)]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    if namespace is not None:
        argv += ["--namespace", namespace]
    return run([*argv, *args], check=check, timeout=timeout, stdin=stdin)


def api_client(kubeconfig: Path) -> Any:
    """An official-client ApiClient for `kubeconfig`."""
    from kubernetes import config

    # The client's config module is untyped; its ApiClient is the typed part.
    return config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
