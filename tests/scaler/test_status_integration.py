"""The status view end to end on the test bed: the scaler process, acting as the chart's
ServiceAccount (its Role allows a patch of the chart's status ConfigMap and nothing else of
ConfigMaps), writes its figures; `python -m jobtide_scaler status` and `kubectl jobtide
status`, with the admin's kubeconfig as a user's, print them with the Lease and the Jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest
from jobtide_scaler.status import STATUS_KEY, StatusDocument, rfc3339
from jobtide_testbed.process import wait_for
from jobtide_testbed.tools import tool
from jobtide_worker import topology
from scaler_bed import RELEASE, ScalerBed, chart_rbac, pipeline

pytestmark = pytest.mark.integration


def status(bed: ScalerBed, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: their kubeconfig in KUBECONFIG, nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "JOBTIDE_"))}
    env["KUBECONFIG"] = str(bed.kube.kubeconfig)
    argv = [sys.executable, "-m", "jobtide_scaler", "status", "-n", bed.namespace, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def watch_twice(bed: ScalerBed) -> tuple[list[str], int]:
    """`status --watch` until it has printed two views, then Ctrl-C (SIGINT): the views and
    the exit code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "JOBTIDE_"))}
    env["KUBECONFIG"] = str(bed.kube.kubeconfig)
    argv = [sys.executable, "-m", "jobtide_scaler", "status", "-n", bed.namespace, RELEASE,
            "--watch", "0.2", "-o", "json"]  # fmt: skip
    # Ctrl-C as a terminal sends it. ci/test runs its lanes in the background, where the shell
    # makes SIGINT ignored, and an ignored SIGINT is inherited: restore it for the command.
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    views = [process.stdout.readline(), process.stdout.readline()]
    process.send_signal(signal.SIGINT)
    return views, process.wait(timeout=30)


def status_json(bed: ScalerBed) -> dict[str, Any]:
    result = status(bed, RELEASE, "-o", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def status_config_map(bed: ScalerBed) -> str:
    docs = chart_rbac(bed.namespace)
    return next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"]


def dead_letter(bed: ScalerBed, queue: str, count: int) -> None:
    def send(channel: Any) -> None:
        channel.confirm_delivery()
        for i in range(count):
            channel.basic_publish(
                "", topology.dead_letter_queue(queue), f"poison {i}".encode(),
                pika.BasicProperties(delivery_mode=2),
            )  # fmt: skip

    bed._channel_do(send)


def lease_holder(bed: ScalerBed) -> str | None:
    out = bed.kube.kubectl(
        "get", "lease", f"{RELEASE}-jobtide-scaler", "-n", bed.namespace,
        "-o", "jsonpath={.spec.holderIdentity}", check=False,
    )  # fmt: skip
    return out.stdout.strip() or None if out.returncode == 0 else None


def test_the_command_prints_what_the_leader_wrote_and_flags_stale_figures(bed: ScalerBed) -> None:
    queue = f"{bed.namespace}-resize"
    bed.declare(queue)
    config_map = status_config_map(bed)
    # Before any scaler ran: the ConfigMap is there, empty.
    empty = status(bed, RELEASE)
    assert empty.returncode == 0, empty.stderr
    assert "figures: none yet" in empty.stdout
    views, code = watch_twice(bed)
    assert code == 0
    assert [json.loads(view)["figures"] for view in views] == [None, None]
    scaler = bed.start(
        bed.config(
            {"resize": pipeline(queue, maxWorkers=5)},
            statusConfigMap=config_map,
            maxTotalWorkers=40,
            leaderElection={"enabled": True, "leaseName": f"{RELEASE}-jobtide-scaler"},
        )
    )
    dead_letter(bed, queue, 2)
    bed.publish(queue, 3)
    bed.wait_jobs(3, "resize")

    def settled() -> dict[str, Any] | None:
        data = status_json(bed)
        p = (data["pipelines"] or {}).get("resize", {})
        done = p.get("ready") == 3 and p.get("deadLettered") == 2 and p.get("active") == 3
        return data if done and p.get("decision") == "none" else None

    wait_for(lambda: settled() is not None, timeout=60, what="the figures of 3 Jobs")
    data = settled()
    assert data is not None
    holder = lease_holder(bed)
    assert holder is not None
    assert data["leader"]["identity"] == holder
    assert data["figures"]["writer"] == holder
    assert data["figures"]["stale"] is False
    p = data["pipelines"]["resize"]
    assert (p["queue"], p["inFlight"], p["maxWorkers"], p["workersFrom"]) == (queue, 0, 5, "jobs")
    assert (data["maxTotalWorkers"], data["activeTotal"]) == (40, 3)
    assert (p["lastCreated"], p["desired"]) == (3, 3)
    assert p["reason"] == "backlog 3 wants 3 worker(s), 3 active"

    table = status(bed, RELEASE)
    assert table.returncode == 0, table.stderr
    print(table.stdout)
    lines = table.stdout.splitlines()
    assert lines[1].startswith(f"leader: {holder} (Lease renewed ")
    assert "STALE" not in table.stdout
    row = next(line for line in lines if line.startswith("resize "))
    assert row.split()[:8] == ["resize", "3", "0", "2", row.split()[4], "3/5", "0", "none"]
    assert next(line for line in lines if line.startswith("(all) ")).split()[1] == "3/40"

    # The same through kubectl's plugin mechanism: kubectl-jobtide on PATH.
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(bed.kube.kubeconfig),
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    plugin = subprocess.run(
        [tool("kubectl"), "jobtide", "status", "-n", bed.namespace, RELEASE, "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert plugin.returncode == 0, plugin.stderr
    assert json.loads(plugin.stdout)["pipelines"]["resize"]["ready"] == 3

    # The scaler stops and hands its Lease back: no leader. Figures not refreshed for longer
    # than their stale limit are flagged (their time set back, as the clock would).
    scaler.process.stop(timeout=10)
    assert lease_holder(bed) is None
    stored = bed.kube.kubectl(
        "get", "configmap", config_map, "-n", bed.namespace, "-o", "json"
    ).stdout  # fmt: skip
    document = StatusDocument.from_json(json.loads(stored)["data"][STATUS_KEY])
    old = replace(document, written_at=rfc3339(0.0))
    bed.kube.kubectl(
        "patch", "configmap", config_map, "-n", bed.namespace, "--type", "merge",
        "-p", json.dumps({"data": {STATUS_KEY: old.to_json()}}),
    )  # fmt: skip
    stale = status(bed, RELEASE)
    assert "leader: none" in stale.stdout
    assert "STALE" in stale.stdout
    assert status_json(bed)["figures"]["stale"] is True


def test_an_unknown_release_is_an_error(bed: ScalerBed) -> None:
    result = status(bed, "nosuchrelease")
    assert result.returncode == 1
    assert "no status ConfigMap of release nosuchrelease" in result.stderr
