"""Start-up figures of the real node: control plane, node (containerd to Ready), and pods of
the worker image from creation to Running, one at a time and in a burst."""

from __future__ import annotations

import statistics
import time

import pytest
from jobtide_testbed.node import Node
from jobtide_testbed.nodepods import create_pod, pool_pod, wait_phase

pytestmark = pytest.mark.bench

SLEEPER = ["/usr/bin/python3", "-c", "import time; time.sleep(600)"]
SEQUENTIAL_PODS = 5
BURST_PODS = 8


def test_pod_startup_on_the_real_node(
    kube_node: Node, node_images: dict[str, str], node_namespace: str
) -> None:
    cluster = kube_node.cluster
    image = node_images["hello"]

    one_by_one = []
    for i in range(SEQUENTIAL_PODS):
        created = create_pod(cluster, node_namespace, pool_pod(f"seq-{i}", image, command=SLEEPER))
        wait_phase(cluster, node_namespace, f"seq-{i}", ("Running",), timeout=120)
        one_by_one.append(time.monotonic() - created)
    cluster.kubectl("delete", "pods", "--all", "-n", node_namespace, "--grace-period=1")

    began = time.monotonic()
    for i in range(BURST_PODS):
        create_pod(cluster, node_namespace, pool_pod(f"burst-{i}", image, command=SLEEPER))
    burst = []
    for i in range(BURST_PODS):
        wait_phase(cluster, node_namespace, f"burst-{i}", ("Running",), timeout=300)
        burst.append(time.monotonic() - began)
    cluster.kubectl("delete", "pods", "--all", "-n", node_namespace, "--grace-period=1")

    print()
    print(f"control plane start-up:            {kube_node.control_plane_seconds:6.1f} s")
    print(f"node start-up (containerd->Ready): {kube_node.startup_seconds:6.1f} s")
    print(
        f"pod create->Running, one at a time: median {statistics.median(one_by_one):.2f} s, "
        f"max {max(one_by_one):.2f} s (n={SEQUENTIAL_PODS})"
    )
    print(
        f"burst of {BURST_PODS} pods: first Running after {min(burst):.2f} s, "
        f"all Running after {max(burst):.2f} s "
        f"({max(burst) / statistics.median(one_by_one):.1f}x one pod)"
    )
    assert len(one_by_one) == SEQUENTIAL_PODS
    assert len(burst) == BURST_PODS
