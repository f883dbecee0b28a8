"""The chart on the test bed's real node, shared by the end-to-end tests and `ci/demo`: its
images built and loaded into the node's containerd, values that fit the node, helm, the
release's broker reached from the host, and a watcher sampling queue depth, worker Jobs and
pods once a second (and keeping each finished worker's log before the Job's TTL removes it).

The host reaches pods directly: it owns the node's bridge, so a pod IP is a route away.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from jobtide_worker.config import BrokerConfig

from jobtide_testbed.images import (
    HELLO_IMAGE,
    SCALER_IMAGE,
    ImageBuilder,
    load_into,
    scaler_image,
    worker_images,
)
from jobtide_testbed.node import POOL_LABEL, POOL_TAINT, Node
from jobtide_testbed.process import run, wait_for
from jobtide_testbed.rabbitmq import NEWEST
from jobtide_testbed.tools import CHART, api_client, ensure_stage, helm, kubectl

# The test bed's own broker release (jobtide_testbed.rabbitmq), as an image.
RABBITMQ_IMAGE = f"jobtide-testbed/rabbitmq:{NEWEST.version}"
RABBITMQ_CONTEXT = Path(__file__).with_name("rabbitmq-image")
# Debian's package starts the server with this script (its /usr/sbin wrapper needs su).
RABBITMQ_COMMAND = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
# The hello example's handler (images/worker/examples/hello): every pipeline on the node runs it.
HELLO_HANDLER = "handler:handle"
WORKER_SELECTOR = "app.kubernetes.io/component=worker"
# The chart's rabbitmq.podSecurityContext: a hostPath volume is not chowned to fsGroup.
RABBITMQ_UID = 999


def build_chart_images(builder: ImageBuilder) -> list[str]:
    """Every image the chart runs, on the test bed's Debian base (builds are cached)."""
    tags = [*worker_images(builder), scaler_image(builder)]
    # The same Debian root the host broker runs from: one RabbitMQ release for both.
    ensure_stage(NEWEST.stage)
    root = builder.import_root(
        NEWEST.root, f"jobtide-testbed/rabbitmq-root:{NEWEST.suite}-{NEWEST.version}"
    )
    builder.build(
        RABBITMQ_CONTEXT / "Dockerfile", RABBITMQ_CONTEXT, RABBITMQ_IMAGE, {"BASE_IMAGE": root}
    )
    return [*tags, RABBITMQ_IMAGE]


def load_chart_images(load: Callable[[Path], None], workdir: Path) -> list[str]:
    """Every image the chart runs, handed to `load` (a node's containerd import)."""
    return load_into(load, build_chart_images, workdir)


def ctr_loader(socket: Path) -> Callable[[Path], None]:
    """`load` for a node known only by its containerd socket (a test bed started by
    `ci/testbed up --node`)."""

    def load(tar: Path) -> None:
        run(["ctr", "--address", str(socket), "--namespace", "k8s.io", "images", "import",
             "--no-unpack=false", str(tar)], timeout=600)  # fmt: skip

    return load


def pool_toleration() -> dict[str, str]:
    return {**POOL_TAINT, "operator": "Equal"}


def local_image(tag: str) -> dict[str, str]:
    """Image values for an image loaded into the node: never pulled (no registry)."""
    repository, _, version = tag.rpartition(":")
    return {"repository": repository, "tag": version, "pullPolicy": "Never"}


def node_values(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`values` (a values document such as values.example.yaml; the chart's defaults when
    None) made to run on the test bed's node, as a new document: the images built here and
    never pulled (every pipeline runs the hello example), Debian's RabbitMQ, and the node's
    pool label and taint. The node is the only one, so the scaler and RabbitMQ tolerate the
    pool taint too (a real cluster keeps them on other nodes), and a pipeline's own node
    selector becomes the pool's (the node has no other labels to select). There is no
    storage provisioner: the broker keeps its data in an emptyDir."""
    adapted = copy.deepcopy(values or {})
    pool_selector = {POOL_LABEL[0]: POOL_LABEL[1]}

    def section(*path: str) -> dict[str, Any]:
        node = adapted
        for key in path:
            node = node.setdefault(key, {})
        return node

    section("scaler").update(image=local_image(SCALER_IMAGE), tolerations=[pool_toleration()])
    section("pipelineDefaults")["image"] = local_image(HELLO_IMAGE)
    section("nodePool").update(nodeSelector=pool_selector, tolerations=[pool_toleration()])
    for name, pipeline in section("pipelines").items():
        pipeline.update(image=local_image(HELLO_IMAGE), handler=HELLO_HANDLER)
        if "nodeSelector" in pipeline.get("podTemplate", {}).get("spec", {}):
            section("pipelines", name, "podTemplate", "spec")["nodeSelector"] = pool_selector
    section("rabbitmq").update(
        image=local_image(RABBITMQ_IMAGE),
        command=RABBITMQ_COMMAND,
        persistence={"enabled": False},
        tolerations=[pool_toleration()],
    )
    return adapted


class Helm:
    """helm 3 against one kubeconfig and namespace."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        result = helm(
            *args, kubeconfig=self.kubeconfig, namespace=self.namespace, check=check,
            timeout=timeout,
        )  # fmt: skip
        return result.stdout + result.stderr

    def install(
        self,
        release: str,
        values_files: Iterable[Path],
        *,
        timeout: str = "6m",
        extra: Iterable[str] = (),
    ) -> str:
        files = [arg for path in values_files for arg in ("-f", str(path))]
        return self("install", release, str(CHART), *files, "--wait", "--timeout", timeout, *extra)

    def values(self, release: str) -> dict[str, Any]:
        """The release's values as helm computed them (the chart's defaults and every file)."""
        computed: dict[str, Any] = json.loads(
            helm("get", "values", release, "--all", "--output", "json",
                 kubeconfig=self.kubeconfig, namespace=self.namespace).stdout
        )  # fmt: skip
        return computed


def write_values(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# The chart's rabbitmq.podSecurityContext: a hostPath volume is not chowned to fsGroup.
RABBITMQ_UID = 999


@contextlib.contextmanager
def host_path_volumes(
    kubeconfig: Path, storage_class: str, count: int, size: str, claims: str
) -> Iterator[str]:
    """`count` static hostPath PersistentVolumes of `size` in a storage class of their own
    named `storage_class` (the test bed has no provisioner), each a folder of the broker's
    user under /var/tmp (a non-root user must reach it). Afterwards the claims the label
    selector `claims` matches are deleted (they outlive a release only when its uninstall
    failed; their protection finalizer holds them until the broker pods are gone), then the
    volumes and their folders."""
    folders: list[Path] = []
    names = [f"{storage_class}-{i}" for i in range(count)]
    try:
        for name in names:
            folder = Path(tempfile.mkdtemp(prefix="jobtide-e2e-broker-", dir="/var/tmp"))
            folders.append(folder)
            os.chown(folder, RABBITMQ_UID, RABBITMQ_UID)
            manifest = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name},
                "spec": {
                    "storageClassName": storage_class,
                    "capacity": {"storage": size},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(folder), "type": "Directory"},
                },
            }
            kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(manifest))
        yield storage_class
    finally:
        where = "jsonpath={.items[*].metadata.namespace}"
        namespaces = kubectl(kubeconfig, "get", "pvc", "-A", "-l", claims, "-o", where,
                             check=False).stdout  # fmt: skip
        for namespace in sorted(set(namespaces.split())):
            kubectl(kubeconfig, "delete", "pvc", "-n", namespace, "-l", claims,
                    "--wait", "--timeout=120s", check=False, timeout=150)  # fmt: skip
        kubectl(kubeconfig, "delete", "pv", *names, "--ignore-not-found", "--wait",
                "--timeout=60s", check=False, timeout=90)  # fmt: skip
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


# Every kind a release (and its scaler's workers) may leave behind.
RELEASE_KINDS = (
    "statefulsets,deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,"
    "roles,rolebindings,poddisruptionbudgets,networkpolicies,persistentvolumeclaims,jobs,leases"
)


def release_objects(kubeconfig: Path, namespace: str, release: str) -> list[str]:
    """`Kind/name` of every object of the release left in the namespace."""
    out = kubectl(kubeconfig, "get", RELEASE_KINDS, "-n", namespace, "-o", "json",
                  "-l", f"app.kubernetes.io/instance={release}").stdout  # fmt: skip
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in json.loads(out)["items"])


def worker_objects(kubeconfig: Path, namespace: str, release: str) -> list[str]:
    """The release's worker Jobs and pods still present."""
    selector = f"app.kubernetes.io/instance={release},{WORKER_SELECTOR}"
    out = kubectl(kubeconfig, "get", "jobs,pods", "-n", namespace, "-o", "name", "-l", selector)
    return out.stdout.split()


@dataclass(frozen=True)
class ReleaseBroker:
    """The release's RabbitMQ, reached from the host at its pod's address."""

    host: str
    username: str
    password: str = field(repr=False)
    amqp_port: int = 5672
    management_port: int = 15672

    @classmethod
    def find(
        cls, kubeconfig: Path, namespace: str, release: str, avoid: Iterable[str] = ()
    ) -> ReleaseBroker:
        """The broker's pod, a ready one not being deleted nor named in `avoid` first (a
        cluster's members come and go)."""
        pods = json.loads(
            kubectl(kubeconfig, "get", "pod", "-n", namespace, "-o", "json", "-l",
                    f"app.kubernetes.io/instance={release},app.kubernetes.io/component=rabbitmq"
                    ).stdout
        )["items"]  # fmt: skip
        avoided = set(avoid)

        def serving(pod: dict[str, Any]) -> bool:
            conditions = pod.get("status", {}).get("conditions", [])
            return (
                pod["metadata"]["name"] not in avoided
                and "deletionTimestamp" not in pod["metadata"]
                and any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            )

        pod = next((p for p in pods if serving(p)), pods[0])
        secret = json.loads(
            kubectl(kubeconfig, "get", "secret", "-n", namespace, "-o", "json", "-l",
                    f"app.kubernetes.io/instance={release}").stdout
        )["items"]  # fmt: skip
        data = next(s["data"] for s in secret if "erlang-cookie" in s.get("data", {}))
        return cls(
            host=pod["status"]["podIP"],
            username=base64.b64decode(data["username"]).decode(),
            password=base64.b64decode(data["password"]).decode(),
        )

    def config(self) -> BrokerConfig:
        return BrokerConfig(
            host=self.host, port=self.amqp_port, username=self.username, password=self.password
        )

    def api(self, path: str) -> Any:
        """GET `/api/<path>` of the management API, decoded."""
        response = requests.get(
            f"http://{self.host}:{self.management_port}/api/{path}",
            auth=(self.username, self.password),
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def queue(self, name: str) -> dict[str, Any]:
        queue: dict[str, Any] = self.api(f"queues/%2F/{name}")
        return queue

    def depth(self, name: str) -> int | None:
        """Ready plus unacknowledged messages; None until the broker has counted them (its
        statistics lag a new queue or a burst by a few seconds)."""
        messages = self.queue(name).get("messages")
        return None if messages is None else int(messages)


@dataclass(frozen=True)
class Sample:
    """One look at the release, `elapsed` seconds after the watcher started."""

    elapsed: float
    ready: dict[str, int]  # per queue
    unacked: dict[str, int]
    acked: dict[str, int]  # per queue: acknowledgements since the broker started
    active_jobs: dict[str, int]  # per pipeline: Jobs not finished
    pending_pods: int
    running_pods: int
    done_tasks: int  # tasks logged done by finished workers so far

    @property
    def depth(self) -> int:
        return sum(self.ready.values()) + sum(self.unacked.values())


def log_entry(line: str) -> dict[str, Any]:
    """A worker's JSON log line (JOBTIDE_LOG_FORMAT=json); {} for anything else."""
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def log_time(entry: dict[str, Any]) -> float:
    """Epoch seconds of a worker's JSON log line (`time`, UTC with milliseconds)."""
    stamp = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def kube_time(text: str) -> float:
    """Epoch seconds of a Kubernetes timestamp (RFC 3339 in UTC, whole seconds)."""
    stamp = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


@dataclass
class WorkerRecord:
    job: str
    pipeline: str
    created: float | None = None  # seconds after the watcher started
    running: float | None = None
    # Epoch seconds (whole) the pod was bound to its node, from its PodScheduled condition.
    scheduled_epoch: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    log: str | None = None

    def entries(self) -> list[dict[str, Any]]:
        """The worker's JSON log lines (JOBTIDE_LOG_FORMAT=json)."""
        return [entry for line in (self.log or "").splitlines() if (entry := log_entry(line))]

    def exit_reason(self) -> str | None:
        reasons = [e.get("reason") for e in self.entries() if e.get("message") == "worker exiting"]
        return str(reasons[-1]) if reasons else None


def executions(records: list[WorkerRecord]) -> Counter[str]:
    """Handler runs that succeeded, per message id: `done`, and `ack-lost` after a success
    whose ack the channel's loss swallowed (the broker then redelivers the task)."""
    runs: Counter[str] = Counter()
    for record in records:
        for entry in record.entries():
            if entry.get("message") != "task":
                continue
            ack_lost_after_success = entry.get("outcome") == "ack-lost" and str(
                entry.get("reason", "")
            ).endswith("before done")
            if entry.get("outcome") == "done" or ack_lost_after_success:
                runs[str(entry["message_id"])] += 1
    return runs


def completed_ids(records: list[WorkerRecord]) -> set[str]:
    """Message ids acknowledged after a successful run: `done`, or `duplicate` (the same
    worker did the task before its ack was lost, and acked the redelivery without a rerun)."""
    return {
        str(entry["message_id"])
        for record in records
        for entry in record.entries()
        if entry.get("message") == "task" and entry.get("outcome") in ("done", "duplicate")
    }


class Watcher:
    """Samples the release every `interval` seconds in a thread until stopped."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        broker: ReleaseBroker,
        queues: dict[str, str],  # pipeline -> queue
        *,
        interval: float = 1.0,
        read_log: Callable[[str, str], str] | None = None,
    ) -> None:
        """`read_log(namespace, pod)` reads a finished worker's log: by default through the
        API (kubelet); pods run as host processes have hostpods.py's."""
        from kubernetes import client

        api = api_client(kubeconfig)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.namespace = namespace
        self.broker = broker
        self.queues = queues
        self.interval = interval
        self.read_log = read_log or self._api_log
        self.samples: list[Sample] = []
        self.workers: dict[str, WorkerRecord] = {}  # by pod name
        self.jobs_seen: set[str] = set()
        # Per pipeline, over every look at the cluster, also those whose broker read failed.
        self.active_jobs_peak: dict[str, int] = {}
        self.peak_total_active_jobs = 0  # over all pipelines, over every look
        self.errors: list[str] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="release-watcher", daemon=True)
        self._listeners: list[Callable[[Sample], None]] = []

    def on_sample(self, listener: Callable[[Sample], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> Watcher:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def done_entries(self) -> list[dict[str, Any]]:
        """The log line of every task a finished worker logged as done (JSON logs)."""
        return [
            entry
            for record in self.workers.values()
            for entry in record.entries()
            if entry.get("message") == "task" and entry.get("outcome") == "done"
        ]

    def done_message_ids(self) -> list[str]:
        return [str(entry["message_id"]) for entry in self.done_entries()]

    def peak_active_jobs(self, pipeline: str) -> int:
        return self.active_jobs_peak.get(pipeline, 0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._sample()
            except Exception as error:  # a dropped sample is reported, not fatal
                self.errors.append(f"{began - self.started:.1f}s: {error!r}")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _api_log(self, namespace: str, pod: str) -> str:
        return str(self.core.read_namespaced_pod_log(pod, namespace))

    def _list(self, call: Callable[..., Any]) -> list[dict[str, Any]]:
        """Worker objects as plain JSON (the client's models are all optional fields)."""
        response = call(self.namespace, label_selector=WORKER_SELECTOR, _preload_content=False)
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def _sample(self) -> None:
        now = time.monotonic() - self.started
        # The cluster first: while the broker is away (restarting), Jobs are still counted
        # and finished workers' logs still kept before their TTL removes them.
        active, pending, running = self._sample_cluster(now)
        ready, unacked, acked = {}, {}, {}
        for queue in self.queues.values():
            q = self.broker.queue(queue)
            ready[queue] = int(q.get("messages_ready", 0))
            unacked[queue] = int(q.get("messages_unacknowledged", 0))
            acked[queue] = int(q.get("message_stats", {}).get("ack", 0))
        sample = Sample(
            elapsed=now,
            ready=ready,
            unacked=unacked,
            acked=acked,
            active_jobs=active,
            pending_pods=pending,
            running_pods=running,
            done_tasks=len(self.done_message_ids()),
        )
        self.samples.append(sample)
        for listener in self._listeners:
            listener(sample)

    def _sample_cluster(self, now: float) -> tuple[dict[str, int], int, int]:
        """Active Jobs per pipeline, pending and running worker pods."""
        active: dict[str, int] = dict.fromkeys(self.queues, 0)
        for job in self._list(self.batch.list_namespaced_job):
            self.jobs_seen.add(job["metadata"]["name"])
            finished = any(
                c["type"] in ("Complete", "Failed") and c["status"] == "True"
                for c in job.get("status", {}).get("conditions", [])
            )
            pipeline = job["metadata"]["labels"].get("jobtide.io/pipeline", "")
            if not finished:
                active[pipeline] = active.get(pipeline, 0) + 1
        pending = running = 0
        for pod in self._list(self.core.list_namespaced_pod):
            name, labels = pod["metadata"]["name"], pod["metadata"]["labels"]
            record = self.workers.setdefault(
                name,
                WorkerRecord(
                    job=labels.get("job-name", ""),
                    pipeline=labels.get("jobtide.io/pipeline", ""),
                    created=now,
                ),
            )
            status = pod.get("status", {})
            phase = status.get("phase")
            if phase == "Pending":
                pending += 1
            elif phase == "Running":
                running += 1
                if record.running is None:
                    record.running = now
                    record.scheduled_epoch = scheduled_time(status)
            elif phase in ("Succeeded", "Failed") and record.finished is None:
                # The log first: a failed read (the apiserver away) is tried again next time.
                record.log = self.read_log(self.namespace, name)
                record.finished = now
                if record.running is None:
                    record.running = now
                for container in status.get("containerStatuses", []):
                    terminated = container.get("state", {}).get("terminated")
                    if terminated:
                        record.exit_code = int(terminated["exitCode"])
        for pipeline, count in active.items():
            self.active_jobs_peak[pipeline] = max(self.active_jobs_peak.get(pipeline, 0), count)
        self.peak_total_active_jobs = max(self.peak_total_active_jobs, sum(active.values()))
        return active, pending, running


def scheduled_time(status: dict[str, Any]) -> float | None:
    """Epoch seconds of a pod's binding to its node (its PodScheduled condition), if bound."""
    for condition in status.get("conditions", []):
        if condition["type"] == "PodScheduled" and condition["status"] == "True":
            return kube_time(condition["lastTransitionTime"])
    return None


def diagnostics(kubeconfig: Path, namespace: str) -> Iterator[str]:
    """Everything worth reading when a run on the node goes wrong: objects, events, and the
    logs of every pod (previous containers included)."""

    def read(*args: str) -> str:
        result = kubectl(kubeconfig, *args, "-n", namespace, check=False)
        return result.stdout + result.stderr

    yield read("get", "all,jobs", "-o", "wide")
    yield read("get", "events", "--sort-by=.lastTimestamp")
    pods = kubectl(kubeconfig, "get", "pods", "-o", "name", "-n", namespace, check=False)
    for pod in pods.stdout.split():
        yield f"==== {pod}\n" + read("logs", pod, "--all-containers", "--tail=60")


def component_selector(release: str, component: str) -> str:
    """The label selector of one component of a release (`rabbitmq`, `scaler`, `worker`)."""
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"


def get_pods(kubeconfig: Path, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "json", "-l", selector).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def task_pid(node: Node, container_id: str) -> int:
    """The host PID of a container's process (containerd's task): for a worker, the worker
    process itself, since the image's entrypoint runs it in exec form."""
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise LookupError(f"no containerd task {container_id}")


def log_message(line: str) -> str | None:
    message = log_entry(line).get("message")
    return None if message is None else str(message)


class ContainerLog:
    """A pod's container log, read from kubelet's file on the host. Opened before the pod is
    deleted, it stays readable after kubelet removes it with the pod, and a line shows there
    as soon as the container writes it (no API round trip)."""

    def __init__(self, node: Node, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]["name"]
        folder = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        # restartPolicy Never: the first container's log is the only one.
        self._file = (node.root / "pod-logs" / folder / container / "0.log").open("rb")
        self.lines: list[str] = []
        self._unread = b""  # a record still being written
        self._unfinished = ""  # parts of a line split over records

    def read(self) -> list[str]:
        """Lines written since the last read. The file's lines are CRI records,
        `<time> <stream> <P|F> <text>`, P marking a part of a longer line."""
        *records, self._unread = (self._unread + self._file.read()).split(b"\n")
        new: list[str] = []
        for record in records:
            _, _, tag, text = record.decode().split(" ", 3)
            self._unfinished += text
            if tag == "F":
                new.append(self._unfinished)
                self._unfinished = ""
        self.lines += new
        return new

    def text_until_exit(self, timeout: float) -> str:
        """The whole log, once the worker has logged its exit."""

        def exited() -> bool:
            self.read()
            return any(log_message(line) == "worker exiting" for line in self.lines)

        wait_for(exited, timeout=timeout, interval=0.2, what="the worker's exit line")
        return "".join(f"{line}\n" for line in self.lines)

    def __enter__(self) -> ContainerLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def lease_holder(kubeconfig: Path, namespace: str, release: str) -> str:
    """The identity holding the release scaler's Lease ("" when none); the Lease is named as
    the scaler's Deployment."""
    deployment = kubectl(kubeconfig, "get", "deployment", "-n", namespace, "-l",
                         component_selector(release, "scaler"),
                         "-o", "jsonpath={.items[0].metadata.name}").stdout  # fmt: skip
    lease = json.loads(kubectl(kubeconfig, "get", "lease", deployment, "-n", namespace, "-o",
                               "json", check=False).stdout or "{}")  # fmt: skip
    return str(lease.get("spec", {}).get("holderIdentity") or "")


def scaler_metric(pod: dict[str, Any], name: str) -> float | None:
    """One unlabelled metric of a scaler pod's /metrics, read at the pod's address."""
    port = next(
        p["containerPort"]
        for container in pod["spec"]["containers"]
        for p in container.get("ports", [])
        if p.get("name") == "metrics"
    )
    response = requests.get(f"http://{pod['status']['podIP']}:{port}/metrics", timeout=10)
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None
