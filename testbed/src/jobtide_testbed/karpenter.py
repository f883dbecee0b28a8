"""A real node autoscaler on the test bed: Karpenter with its kwok cloud provider, run as a
process against a `KubeCluster` (no leader election, admin kubeconfig), and a kwok of its own
that plays the kubelet of the nodes Karpenter launches (stages in kwok-karpenter/stages.yaml).
Pods bound to those nodes run for real as host processes (hostpods.py).

    pool = AutoscaledPool(cluster, root).start()
    pool.apply_node_pool(NodePoolSpec(name="jobs", label=..., taint=...))
    ...
    pool.stop()   # deletes the NodePools, waits for their nodes to go, stops everything

Karpenter's kwok provider creates each Node itself (named `kwok-<nodeclaim>-...`), labelled
and annotated `kwok.x-k8s.io/node=fake`, with the capacity of the instance type it chose from
its built-in list (`c-2x-amd64-linux`: 2 CPUs, 4 GiB, 100m kube-reserved, ...).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobtide_testbed.chartnode import kube_time, node_values
from jobtide_testbed.hostpods import KWOK_NODE_LABEL, HostPods
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import Process, free_port, wait_for
from jobtide_testbed.tools import CACHE, kubectl, tool

# Copied out of the module's source by ci/setup (build_karpenter).
CRDS = CACHE / "karpenter-crds"
# How long Karpenter must stay up after its first /readyz to count as started.
KARPENTER_SETTLE_SECONDS = 3.0
KWOK_STAGES = Path(__file__).with_name("kwok-karpenter") / "stages.yaml"
NODE_CLASS = "default"
NODEPOOL_LABEL = "karpenter.sh/nodepool"

# Shaped like values.example.yaml's node pool: label and taint `jobtide.io/pool=jobs`. The
# real node carries `jobtide.io/pool=workers`, so no worker lands there.
POOL_LABEL = ("jobtide.io/pool", "jobs")
POOL_TAINT = {"key": "jobtide.io/pool", "value": "jobs", "effect": "NoSchedule"}
# Four of these workers fill a node of either instance type (2 CPUs less 100m kube-reserved).
WORKER_RESOURCES = {"requests": {"cpu": "450m", "memory": "256Mi"}, "limits": {"memory": "256Mi"}}


@dataclass(frozen=True)
class NodePoolSpec:
    """A Karpenter NodePool like values.example.yaml's node pool: a label the workers select,
    a taint only they tolerate, a few instance types, and how it consolidates."""

    name: str = "jobs"
    label: tuple[str, str] = POOL_LABEL
    taint: Mapping[str, str] = field(default_factory=lambda: dict(POOL_TAINT))
    instance_types: tuple[str, ...] = ("c-2x-amd64-linux", "s-2x-amd64-linux")
    consolidation_policy: str = "WhenEmpty"  # or WhenEmptyOrUnderutilized
    consolidate_after: str = "10s"
    limits: Mapping[str, str] = field(default_factory=lambda: {"cpu": "40"})
    # Share of the pool's nodes Karpenter may disrupt at once (its default is 10%).
    disruption_budget: str = "100%"

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "karpenter.sh/v1",
            "kind": "NodePool",
            "metadata": {"name": self.name},
            "spec": {
                "template": {
                    "metadata": {"labels": {self.label[0]: self.label[1]}},
                    "spec": {
                        "nodeClassRef": {
                            "group": "karpenter.kwok.sh",
                            "kind": "KWOKNodeClass",
                            "name": NODE_CLASS,
                        },
                        "taints": [dict(self.taint)],
                        "requirements": [
                            requirement("node.kubernetes.io/instance-type", *self.instance_types),
                            requirement("karpenter.sh/capacity-type", "on-demand"),
                            requirement("kubernetes.io/os", "linux"),
                            requirement("kubernetes.io/arch", "amd64"),
                        ],
                    },
                },
                "disruption": {
                    "consolidationPolicy": self.consolidation_policy,
                    "consolidateAfter": self.consolidate_after,
                    "budgets": [{"nodes": self.disruption_budget}],
                },
                "limits": dict(self.limits),
            },
        }


def pool_values(spec: NodePoolSpec) -> dict[str, Any]:
    """The chart's node-pool values for workers on `spec`'s nodes. Karpenter must not move a
    busy worker: `karpenter.sh/do-not-disrupt` keeps it on its node until it exits."""
    return {
        "nodeSelector": {spec.label[0]: spec.label[1]},
        "tolerations": [{**spec.taint, "operator": "Equal"}],
        "podAnnotations": {
            "karpenter.sh/do-not-disrupt": "true",
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        },
    }


def pool_chart_values(spec: NodePoolSpec, pipelines: dict[str, Any]) -> dict[str, Any]:
    """The chart's values for the test bed's real node (chartnode.node_values) with the
    workers on `spec`'s pool: its node-pool values, WORKER_RESOURCES, JSON worker logs (the
    tests read each done task's line), queue statistics every second, a 2 s scaler poll."""
    values = node_values()
    values["scaler"]["pollIntervalSeconds"] = 2
    values["rabbitmq"]["extraConfig"] = "collect_statistics_interval = 1000"
    values["nodePool"] = pool_values(spec)
    values["pipelineDefaults"]["resources"] = WORKER_RESOURCES
    values["pipelineDefaults"]["env"] = [{"name": "JOBTIDE_LOG_FORMAT", "value": "json"}]
    values["pipelines"] = pipelines
    return values


def requirement(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


def node_class(registration_delay: str) -> dict[str, Any]:
    """The KWOKNodeClass every NodePool here refers to; `registration_delay` (e.g. "5s") is
    how long a launched node takes to appear, like an instance booting."""
    return {
        "apiVersion": "karpenter.kwok.sh/v1alpha1",
        "kind": "KWOKNodeClass",
        "metadata": {"name": NODE_CLASS},
        "spec": {"nodeRegistrationDelay": registration_delay},
    }


class AutoscaledPool:
    """Karpenter, its kwok and the host-pod runner, against one cluster."""

    def __init__(
        self,
        cluster: KubeCluster,
        root: Path,
        *,
        registration_delay: str = "2s",
        detached: bool = False,
    ) -> None:
        """`detached` runs the host pods in a process of their own (`python -m
        testbed.hostpods`) rather than in a thread of this one: for `ci/testbed up`, whose
        command exits while the pool runs."""
        self.cluster = cluster
        self.root = root
        self.logs = root / "logs"
        self.registration_delay = registration_delay
        self.health_port = free_port()
        self.kwok = Process(
            "kwok-karpenter",
            [
                tool("kwok"),
                f"--kubeconfig={cluster.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}",
                f"--config={KWOK_STAGES}",
                "--server-address=127.0.0.1:0",
                "--node-lease-duration-seconds=40",
                # The pods' addresses: a range no real network of the test bed uses.
                "--cidr=10.245.0.0/16",
                "--node-ip=10.245.0.1",
            ],
            self.logs,
        )
        self.karpenter = Process(
            "karpenter", [tool("karpenter-kwok")], self.logs, env=self._karpenter_env()
        )
        self.host_pods_root = root / "hostpods"
        self.host_pods = HostPods(cluster.kubeconfig, self.host_pods_root)
        self.host_pods_process = (
            Process(
                "host-pods",
                [
                    sys.executable,
                    "-m",
                    "jobtide_testbed.hostpods",
                    str(cluster.kubeconfig),
                    str(self.host_pods_root),
                ],
                self.logs,
            )
            if detached
            else None
        )
        self.node_pools: list[str] = []

    @property
    def processes(self) -> list[Process]:
        return [self.kwok, self.karpenter, *filter(None, [self.host_pods_process])]

    def _karpenter_env(self) -> dict[str, str]:
        """Karpenter's operator options, from the environment (pkg/operator/options)."""
        return {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            # One replica outside the cluster: no Lease to win first.
            "DISABLE_LEADER_ELECTION": "true",
            # Both bind every interface (":<port>", not configurable): free ports, and only
            # the health port is used (readiness).
            "METRICS_PORT": str(free_port()),
            "HEALTH_PROBE_PORT": str(self.health_port),
            "LOG_LEVEL": "info",
            # Karpenter sets GOMAXPROCS-like limits from these; the machine is small.
            "CPU_REQUESTS": "500",
        }

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> AutoscaledPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> AutoscaledPool:
        try:
            self.install_crds()
            self.kwok.start()
            self._start_karpenter()
            self.cluster.apply(node_class(self.registration_delay))
            if self.host_pods_process is None:
                self.host_pods.start()
            else:
                self.host_pods_process.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_karpenter(self, attempts: int = 3) -> None:
        """Start Karpenter until it stays up. Its ports are picked free but bound by Karpenter
        a moment later on every interface, so another process may take one first: Karpenter
        then answers /readyz and exits a second later (metrics server: address already in
        use). Such a start is retried on fresh ports."""
        for attempt in range(1, attempts + 1):
            self.karpenter.start()
            try:
                wait_for(self._karpenter_ready, timeout=120, what="Karpenter /readyz", interval=0.5)
                time.sleep(KARPENTER_SETTLE_SECONDS)
                self.karpenter.check_alive()
                return
            except (RuntimeError, TimeoutError) as e:
                if attempt == attempts or "address already in use" not in self.karpenter.tail():
                    raise
                print(f"Karpenter lost a port to another process ({e!r}); starting it again")
                self.karpenter.stop()
                self.health_port = free_port()
                self.karpenter = Process(
                    "karpenter", [tool("karpenter-kwok")], self.logs, env=self._karpenter_env()
                )

    def install_crds(self) -> None:
        files = sorted(CRDS.glob("*.yaml"))
        if not files:
            raise FileNotFoundError(f"{CRDS} has no CRDs: run ci/setup first")
        for crd in files:
            self.cluster.kubectl("apply", "--server-side", "-f", str(crd))
        for crd in files:
            self.cluster.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", "-f", str(crd)
            )

    def apply_node_pool(self, spec: NodePoolSpec) -> None:
        self.cluster.apply(spec.manifest())
        if spec.name not in self.node_pools:
            self.node_pools.append(spec.name)

    def delete_node_pools(self, timeout: float = 180) -> None:
        """Delete every NodePool applied here; Karpenter drains and removes their nodes."""
        for name in self.node_pools:
            self.cluster.kubectl("delete", "nodepool", name, "--wait=false", check=False)
        if self.node_pools and self.karpenter.running():
            wait_for(
                lambda: not self.nodes() and not self.node_claims(),
                timeout=timeout,
                what="Karpenter's nodes and NodeClaims removed",
                interval=1,
            )
        self.node_pools.clear()

    def stop(self) -> None:
        try:
            self.delete_node_pools()
        finally:
            self.host_pods.stop()
            if self.host_pods_process is not None:
                self.host_pods_process.stop()
            self.karpenter.stop()
            self.kwok.stop()

    # -- state --------------------------------------------------------------------------
    def nodes(self, node_pool: str | None = None) -> list[dict[str, Any]]:
        return pool_nodes(self.cluster.kubeconfig, node_pool)

    def node_claims(self) -> list[dict[str, Any]]:
        return list_objects(self.cluster.kubeconfig, "nodeclaims.karpenter.sh")

    def _karpenter_ready(self) -> bool:
        self.karpenter.check_alive()
        self.kwok.check_alive()
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200


@dataclass
class PodRecord:
    """A pod bound to one of the pool's nodes, in seconds after the watch began (times read
    from the API have its 1 s precision, times seen by a sample the sampling period's)."""

    node: str
    bound: float | None = None  # its PodScheduled condition
    exited: float | None = None  # its container's finishedAt
    deleted: float | None = None  # its deletionTimestamp, or when it was first seen gone


@dataclass
class NodeRecord:
    """One node of the pool, in seconds after the watch began."""

    name: str
    instance_type: str
    seen: float
    # Its NodeClaim's creation: when Karpenter launched the instance (1 s precision). The
    # Node itself appears only once the instance has registered.
    launched: float | None = None
    ready: float | None = None
    gone: float | None = None
    allocatable: Mapping[str, str] = field(default_factory=dict)
    claim: str = ""
    # Karpenter's view of it, from its NodeClaim: the last pod event it recorded
    # (`status.lastPodEventTime`), when it became Consolidatable, and the claim's deletion
    # (`deletionTimestamp`: the disruption decision, once validated), and when the claim was
    # gone. And the Node's own deletionTimestamp.
    last_pod_event: float | None = None
    consolidatable: float | None = None
    decided: float | None = None
    node_deleting: float | None = None
    claim_gone: float | None = None
    pods: list[PodRecord] = field(default_factory=list)

    @property
    def billed_from(self) -> float:
        """A node is billed from its launch (from its appearance if its claim was missed)."""
        return self.seen if self.launched is None else min(self.launched, self.seen)

    def last(self, what: str) -> float | None:
        """The latest `bound`, `exited` or `deleted` of its pods."""
        times = [t for pod in self.pods if (t := getattr(pod, what)) is not None]
        return max(times) if times else None


def list_objects(kubeconfig: Path, *args: str) -> list[dict[str, Any]]:
    out = kubectl(kubeconfig, "get", *args, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def pool_nodes(kubeconfig: Path, node_pool: str | None = None) -> list[dict[str, Any]]:
    """Karpenter's nodes: of one NodePool, or of every one."""
    selector = NODEPOOL_LABEL if node_pool is None else f"{NODEPOOL_LABEL}={node_pool}"
    return list_objects(kubeconfig, "nodes", "-l", selector)


class NodeWatch:
    """The nodes of one NodePool, looked at on each `sample()` (e.g. once a second, as a
    chartnode.Watcher listener): launches, Ready times, removals, node-seconds, peak; and
    with `pods_namespace`, each node's tail: its pods' binding, exit and deletion, and
    Karpenter's last pod event, disruption decision and the claim's removal."""

    def __init__(self, kubeconfig: Path, node_pool: str, pods_namespace: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.node_pool = node_pool
        self.pods_namespace = pods_namespace
        self.started = time.monotonic()
        self.started_epoch = time.time()  # the same instant, on the wall clock
        self.records: dict[str, NodeRecord] = {}
        self.counts: list[tuple[float, int]] = []
        self.pods: dict[str, PodRecord] = {}  # by uid

    def sample(self, *_: object) -> None:
        """Look at the nodes once (extra arguments ignored: a Watcher passes its Sample)."""
        now = time.monotonic() - self.started
        present = {}
        for node in pool_nodes(self.kubeconfig, self.node_pool):
            name = node["metadata"]["name"]
            present[name] = node
            instance_type = node["metadata"]["labels"].get("node.kubernetes.io/instance-type", "")
            allocatable = node.get("status", {}).get("allocatable", {})
            record = self.records.setdefault(
                name, NodeRecord(name, instance_type, now, allocatable=allocatable)
            )
            if record.ready is None and node_ready(node):
                record.ready = now
            deleting = node["metadata"].get("deletionTimestamp")
            if deleting and record.node_deleting is None:
                record.node_deleting = self._since(deleting)
        for record in self.records.values():
            if record.gone is None and record.name not in present:
                record.gone = now
        if self.pods_namespace is not None:
            self._read_claims(now)
            self._read_pods(now)
        elif any(r.launched is None and r.gone is None for r in self.records.values()):
            self._read_claims(now)
        self.counts.append((now, len(present)))

    def _since(self, stamp: str) -> float:
        return kube_time(stamp) - self.started_epoch

    def _read_claims(self, now: float) -> None:
        """Each node's launch from its NodeClaim; with the tail watched, Karpenter's last pod
        event, its Consolidatable condition, the claim's deletion and removal."""
        claims = list_objects(
            self.kubeconfig, "nodeclaims.karpenter.sh", "-l", f"{NODEPOOL_LABEL}={self.node_pool}"
        )
        present = set()
        for claim in claims:
            status = claim.get("status", {})
            record = self.records.get(status.get("nodeName", ""))
            if record is None:
                continue
            record.claim = claim["metadata"]["name"]
            present.add(record.claim)
            if record.launched is None:
                record.launched = self._since(claim["metadata"]["creationTimestamp"])
            if status.get("lastPodEventTime"):
                record.last_pod_event = self._since(status["lastPodEventTime"])
            for condition in status.get("conditions", []):
                if condition["type"] == "Consolidatable" and condition["status"] == "True":
                    record.consolidatable = self._since(condition["lastTransitionTime"])
            deleting = claim["metadata"].get("deletionTimestamp")
            if deleting and record.decided is None:
                record.decided = self._since(deleting)
        for record in self.records.values():
            if record.claim and record.claim_gone is None and record.claim not in present:
                record.claim_gone = now

    def _read_pods(self, now: float) -> None:
        """The pods bound to the pool's nodes: their binding, exit and deletion."""
        assert self.pods_namespace is not None
        seen = set()
        for pod in list_objects(self.kubeconfig, "pods", "-n", self.pods_namespace):
            node = pod.get("spec", {}).get("nodeName", "")
            record = self.records.get(node)
            if record is None:
                continue
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            if uid not in self.pods:
                self.pods[uid] = PodRecord(node)
                record.pods.append(self.pods[uid])
            tracked = self.pods[uid]
            status = pod.get("status", {})
            for condition in status.get("conditions", []):
                if condition["type"] == "PodScheduled" and condition["status"] == "True":
                    tracked.bound = self._since(condition["lastTransitionTime"])
            for container in status.get("containerStatuses", []):
                finished = container.get("state", {}).get("terminated", {}).get("finishedAt")
                if finished:
                    tracked.exited = self._since(finished)
            deleting = pod["metadata"].get("deletionTimestamp")
            if deleting and tracked.deleted is None:
                tracked.deleted = self._since(deleting)
        for uid, tracked in self.pods.items():
            if uid not in seen and tracked.deleted is None:
                tracked.deleted = now

    @property
    def peak(self) -> int:
        return max((count for _, count in self.counts), default=0)

    def node_seconds(self) -> float:
        """What the nodes bill: each from its launch to its removal (or the last sample)."""
        end = self.counts[-1][0] if self.counts else 0.0
        return sum(
            (r.gone if r.gone is not None else end) - r.billed_from for r in self.records.values()
        )

    def provisioning_seconds(self) -> list[float]:
        """Each node's launch to Ready: what a node takes to serve, as the simulator draws it."""
        return [r.ready - r.billed_from for r in self.records.values() if r.ready is not None]

    def first_ready(self) -> float | None:
        ready = [r.ready for r in self.records.values() if r.ready is not None]
        return min(ready) if ready else None

    def zero_since(self) -> float | None:
        """When the pool last became empty (None while it has nodes)."""
        if not self.counts or self.counts[-1][1]:
            return None
        since = self.counts[-1][0]
        for at, count in reversed(self.counts):
            if count:
                break
            since = at
        return since


def node_ready(node: Mapping[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def karpenter_events(kubeconfig: Path) -> Iterator[dict[str, Any]]:
    """Every event Karpenter recorded (all namespaces; pods', nodes' and NodeClaims')."""
    for event in list_objects(kubeconfig, "events", "-A"):
        source = event.get("source", {}).get("component") or event.get("reportingComponent")
        if source == "karpenter":
            yield event
