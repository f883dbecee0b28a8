"""Finding what a crashed node run left running: the node lock's new holder kills every
process of a node whose kubelet or containerd still runs (its run died without stopping it),
and nothing else. The process table here is made up; the kill itself is `os.kill`."""

from __future__ import annotations

import pytest
from jobtide_testbed.node import crashed_node_roots, processes_under

pytestmark = pytest.mark.unit

CRASHED = "/tmp/pytest-of-root/pytest-33/kube-node0"
OTHER = "/tmp/pytest-of-root/pytest-34/kube0"
PROCESSES = {
    10: [b"/bin/kubelet", f"--config={CRASHED}/node/kubelet.yaml".encode(), b"--v=1"],
    11: [b"containerd", b"--config", f"{CRASHED}/node/containerd.toml".encode()],
    12: [b"/bin/etcd", b"--data-dir", f"{CRASHED}/kube/etcd".encode()],
    13: [b"/bin/kube-proxy", f"--config={CRASHED}/node/kube-proxy.yaml".encode()],
    # A control plane without a node (another session's): not a node, left alone.
    20: [b"/bin/etcd", b"--data-dir", f"{OTHER}/etcd".encode()],
    # A neighbouring folder whose name starts with the crashed one's.
    21: [b"/bin/etcd", b"--data-dir", f"{CRASHED}1/kube/etcd".encode()],
    22: [b"sleep", b"infinity"],
}


def test_a_node_is_known_by_its_kubelet_or_containerd_configuration() -> None:
    assert crashed_node_roots(PROCESSES.values()) == {CRASHED}
    assert crashed_node_roots([PROCESSES[20], PROCESSES[22]]) == set()


def test_every_process_under_the_crashed_node_and_nothing_else_goes() -> None:
    assert sorted(processes_under(PROCESSES, {CRASHED})) == [10, 11, 12, 13]
    assert processes_under(PROCESSES, set()) == []
