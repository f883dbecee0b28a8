"""Worker pods on nodes that run no containers, run for real as host processes.

kwok plays the kubelet of the nodes Karpenter launches: it binds nothing to a runtime, so a
worker pod there would run nothing. `HostPods` is the rest of that kubelet, for worker pods:
for each pod kwok has made Running on such a node it starts the real `jobtide_worker` runner
with the pod's own environment (values, Secret and ConfigMap keys, pod fields; a Service's
DNS name mapped to its ClusterIP, which kube-proxy routes from the host too), the pod's
Secret volumes as files (in a private folder of the pod's own, mode 0600, removed when the
pod ends; a value naming a path under such a mount names the file there) and a handler
the pod's image stands for (the hello example sleeps each task's `seconds`). When the process
exits, the pod's status says so (Succeeded for exit code 0, else Failed, with the exit code),
so the Job controller, the TTL controller, the scaler's Job cache and Karpenter all see a
real lifecycle. Each process reads its node's creation as the kernel's boot time (its own
time namespace, `jobtide_testbed.nodeboot`), as a container on that node reads the node's
boot: the worker's node priority sees one node per kwok node. A pod being deleted (eviction,
a drain, the Job's TTL) has its process sent SIGTERM, and SIGKILL once its grace period is
over, as a kubelet would.

Bounded: at most `MAX_PROCESSES` processes at once, talking only to the test bed's own
addresses. They run as the test bed's own user, not the pod's `runAsUser`: the interpreter of
the test bed's virtualenv may live where no other user can execute it (pyenv under /root).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobtide_testbed.chartnode import kube_time
from jobtide_testbed.images import HELLO_IMAGE
from jobtide_testbed.nodeboot import booted_at, earliest_start
from jobtide_testbed.tools import REPO, api_client

# The label (and annotation) Karpenter's kwok provider puts on every node it launches.
KWOK_NODE_LABEL = ("kwok.x-k8s.io/node", "fake")
MAX_PROCESSES = 100
# The handler code each worker image stands for on the host.
HANDLER_DIRS: dict[str, Path] = {HELLO_IMAGE: REPO / "images" / "worker" / "examples" / "hello"}
# A Service's cluster DNS name: name.namespace.svc[.cluster.local]
SERVICE_NAME = re.compile(r"^([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?$")


class PodSpecError(ValueError):
    """A pod this runner cannot run; the message names the field."""


@dataclass
class HostPod:
    """One pod's process and what became of it."""

    namespace: str
    name: str
    uid: str
    node: str
    container: str
    image: str
    log_path: Path
    started_at: str
    # The node's creation (Unix seconds), which the process reads as its kernel's boot time.
    node_booted: float | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    term_sent: bool = False
    kill_after: float | None = None  # monotonic time at which a signalled process is killed
    exit_code: int | None = None
    signalled: str | None = None  # why SIGTERM was sent (the pod's deletion), if it was
    # The private folder of the pod's Secret volumes, while the pod runs.
    volumes_dir: Path | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class HostPods:
    """Runs the worker pods of kwok-managed nodes as host processes, in a thread."""

    def __init__(self, kubeconfig: Path, root: Path, *, interval: float = 0.5) -> None:
        from kubernetes import client

        api = api_client(kubeconfig)
        self.core = client.CoreV1Api(api)
        self.root = root
        self.interval = interval
        self.running: dict[str, HostPod] = {}  # by pod uid
        self.finished: dict[str, HostPod] = {}  # by pod uid
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="host-pods", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> HostPods:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, and SIGKILL whatever still runs (the cluster is going away)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for pod in list(self.running.values()):
            if pod.process is not None:
                _signal_group(pod.process, signal.SIGKILL)
                pod.process.wait(timeout=10)
                pod.exit_code = _exit_code(pod.process.returncode)
            _remove_volumes(pod)
            self.finished[pod.uid] = self.running.pop(pod.uid)

    # -- what happened ------------------------------------------------------------------
    def pods(self) -> list[HostPod]:
        """Every pod run so far, running or finished."""
        return [*self.finished.values(), *self.running.values()]

    def read_log(self, namespace: str, name: str) -> str:
        """The output of the pod's process (like `kubectl logs`)."""
        return read_log(self.root, namespace, name)

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._sync()
            except Exception as error:  # one failed look is reported, the next one retries
                self.errors.append(f"{time.strftime('%H:%M:%S')}: {error!r}")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _sync(self) -> None:
        selector = f"{KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}"
        nodes = {
            n["metadata"]["name"]: kube_time(n["metadata"]["creationTimestamp"])
            for n in self._items(self.core.list_node, selector)
        }
        pods = {
            p["metadata"]["uid"]: p
            for p in self._items(self.core.list_pod_for_all_namespaces, None)
            if p.get("spec", {}).get("nodeName") in nodes
        }
        for uid, pod in pods.items():
            phase = pod.get("status", {}).get("phase")
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if uid in self.running:
                if deleting:
                    self._terminate(self.running[uid], pod)
            elif uid not in self.finished and phase == "Running":
                node_booted = nodes[pod["spec"]["nodeName"]]
                # kwok runs a pod as soon as its node exists: its boot comes first.
                if time.time() >= earliest_start(node_booted):
                    self._start(pod, deleting, node_booted)
        for uid, host_pod in list(self.running.items()):
            self._reap(host_pod, pods.get(uid))

    def _items(self, call: Any, selector: str | None) -> list[dict[str, Any]]:
        kwargs = {"label_selector": selector} if selector else {}
        response = call(_preload_content=False, **kwargs)
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def _start(self, pod: dict[str, Any], deleting: bool, node_booted: float) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        host_pod = HostPod(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            node=spec["nodeName"],
            container=container["name"],
            image=container["image"],
            log_path=log_path(self.root, meta["namespace"], meta["name"]),
            started_at=_now(),
            node_booted=node_booted,
        )
        self.running[host_pod.uid] = host_pod
        if deleting:  # deleted before it ran: it never will (a container killed at once)
            host_pod.exit_code = 128 + signal.SIGKILL
            return
        host_pod.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if len(self.running) > MAX_PROCESSES:
                raise PodSpecError(f"more than {MAX_PROCESSES} host processes")
            argv, env, cwd = self._command(pod, host_pod)
            argv = [*booted_at(node_booted), *argv]  # the node's boot, as on the node
            with host_pod.log_path.open("wb") as log:
                host_pod.process = subprocess.Popen(
                    argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        except Exception as error:  # the pod fails, as a container that cannot start would
            self.errors.append(f"{host_pod.key}: not started: {error}")
            host_pod.log_path.write_text(f"host pod not started: {error}\n")
            host_pod.exit_code = 128
            _remove_volumes(host_pod)

    def _command(
        self, pod: dict[str, Any], host_pod: HostPod
    ) -> tuple[list[str], dict[str, str], Path]:
        spec = pod["spec"]
        if len(spec["containers"]) != 1:
            raise PodSpecError("spec.containers: a host pod runs exactly one container")
        container = spec["containers"][0]
        handler_dir = HANDLER_DIRS.get(container["image"])
        if handler_dir is None:
            raise PodSpecError(
                f"spec.containers[0].image: no host handler for {container['image']!r} "
                f"(known: {sorted(HANDLER_DIRS)})"
            )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(handler_dir),
            "PYTHONUNBUFFERED": "1",
            "HOME": "/nonexistent",
            # As kubelet sets it: the worker names itself after the pod.
            "HOSTNAME": pod["metadata"]["name"],
        }
        mounts = self._secret_mounts(pod, container, host_pod)
        for name, value in self._container_env(pod, container).items():
            env[name] = _host_path(value, mounts)
        return [sys.executable, "-m", "jobtide_worker"], env, handler_dir

    def _secret_mounts(
        self, pod: dict[str, Any], container: dict[str, Any], host_pod: HostPod
    ) -> dict[str, Path]:
        """The container's mounts of Secret volumes, written as files into the pod's private
        folder (0700, files 0600: the processes run as the test bed's user); by mount path,
        the host path standing for it. Mounts of other volume types are left out: the host
        process has its own /tmp, and the worker reads no other volume."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        namespace = pod["metadata"]["namespace"]
        mounts: dict[str, Path] = {}
        for index, mount in enumerate(container.get("volumeMounts") or []):
            volume = volumes.get(mount["name"])
            where = f"volumeMounts[{index}] ({mount['name']})"
            if volume is None:
                raise PodSpecError(f"{where}: the pod has no such volume")
            if "secret" not in volume:
                continue
            if host_pod.volumes_dir is None:
                host_pod.volumes_dir = Path(tempfile.mkdtemp(prefix=f"hostpod-{host_pod.uid}-"))
            folder = host_pod.volumes_dir / volume["name"]
            if not folder.exists():
                self._write_secret_volume(namespace, volume["secret"], folder, where)
            sub_path = mount.get("subPath", "")
            mounts[mount["mountPath"].rstrip("/")] = folder / sub_path if sub_path else folder
        return mounts

    def _write_secret_volume(
        self, namespace: str, source: dict[str, Any], folder: Path, where: str
    ) -> None:
        """A Secret volume's files as kubelet would project them (its `items`, or every
        key), readable by the owner only."""
        from kubernetes.client.exceptions import ApiException

        try:
            data = self._secret_bytes(namespace, source["secretName"])
        except ApiException as error:
            if error.status == 404 and source.get("optional"):
                data = {}
            else:
                raise
        items = source.get("items") or [{"key": key, "path": key} for key in sorted(data)]
        folder.mkdir(mode=0o700)
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise PodSpecError(f"{where}: key {item['key']!r} not in {source['secretName']}")
            path = folder / item["path"]
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data[item["key"]])

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container's environment as kubelet would give it (no `$(VAR)` expansion)."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for index, source in enumerate(container.get("envFrom", [])):
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret(namespace, source["secretRef"]["name"])
            elif "configMapRef" in source:
                data = self._config_map(namespace, source["configMapRef"]["name"])
            else:
                raise PodSpecError(f"envFrom[{index}]: neither secretRef nor configMapRef")
            env.update({prefix + key: value for key, value in data.items()})
        for index, var in enumerate(container.get("env", [])):
            where = f"env[{index}] ({var['name']})"
            if "valueFrom" not in var:
                env[var["name"]] = self._host_address(var.get("value", ""))
                continue
            source = var["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._secret(namespace, ref["name"])
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self._config_map(namespace, ref["name"])
            elif "fieldRef" in source:
                env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"], where)
                continue
            else:
                raise PodSpecError(f"{where}: valueFrom {sorted(source)} is not supported here")
            if ref["key"] not in data:
                raise PodSpecError(f"{where}: key {ref['key']!r} not in {ref['name']}")
            env[var["name"]] = data[ref["key"]]
        return env

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        return {k: v.decode() for k, v in self._secret_bytes(namespace, name).items()}

    def _secret_bytes(self, namespace: str, name: str) -> dict[str, bytes]:
        secret = self.core.read_namespaced_secret(name, namespace)
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.core.read_namespaced_config_map(name, namespace).data or {})

    def _host_address(self, value: str) -> str:
        """A Service's DNS name becomes its ClusterIP (the host has no cluster DNS); any
        other value is kept."""
        match = SERVICE_NAME.match(value)
        if not match:
            return value
        service = self.core.read_namespaced_service(match.group(1), match.group(2))
        if service.spec is None or not service.spec.cluster_ip:
            raise PodSpecError(f"{value}: the Service has no ClusterIP")
        return str(service.spec.cluster_ip)

    def _terminate(self, host_pod: HostPod, pod: dict[str, Any]) -> None:
        """The pod is being deleted: SIGTERM now, SIGKILL after its grace period."""
        if host_pod.term_sent or host_pod.process is None:
            return
        grace = pod["metadata"].get("deletionGracePeriodSeconds") or 0
        host_pod.term_sent = True
        host_pod.signalled = "pod deleted"
        host_pod.kill_after = time.monotonic() + float(grace)
        _signal_group(host_pod.process, signal.SIGTERM)

    def _reap(self, host_pod: HostPod, pod: dict[str, Any] | None) -> None:
        process = host_pod.process
        if process is not None:
            if pod is None:  # removed without a graceful deletion (force delete, node gone)
                host_pod.signalled = host_pod.signalled or "pod removed"
                _signal_group(process, signal.SIGKILL)
            elif host_pod.kill_after is not None and time.monotonic() > host_pod.kill_after:
                _signal_group(process, signal.SIGKILL)
            code = process.poll()
            if code is None:
                return
            host_pod.exit_code = _exit_code(code)
        _remove_volumes(host_pod)
        if pod is not None and host_pod.exit_code is not None:
            self._write_exit(host_pod)
        del self.running[host_pod.uid]
        self.finished[host_pod.uid] = host_pod

    def _write_exit(self, host_pod: HostPod) -> None:
        """What kubelet writes when the container ends (restartPolicy Never)."""
        code = host_pod.exit_code or 0
        now = _now()
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [
                {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": host_pod.container,
                    "image": host_pod.image,
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": "Completed" if code == 0 else "Error",
                            "startedAt": host_pod.started_at,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(
                host_pod.name, host_pod.namespace, {"status": status}
            )
        except ApiException as error:
            if error.status != 404:  # gone meanwhile: nothing left to tell
                raise


def log_path(root: Path, namespace: str, name: str) -> Path:
    """Where the process of pod `namespace/name` writes its output."""
    return root / namespace / f"{name}.log"


def read_log(root: Path, namespace: str, name: str) -> str:
    """A pod's process output; '' if it never ran (kept after the pod is gone)."""
    try:
        return log_path(root, namespace, name).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _host_path(value: str, mounts: Mapping[str, Path]) -> str:
    """A value naming a path under one of `mounts` (a mount path, or a file under it) names
    the same path under the host folder standing for it; any other value is kept."""
    for mount_path, host in mounts.items():
        if value == mount_path:
            return str(host)
        if value.startswith(mount_path + "/"):
            return str(host / value.removeprefix(mount_path + "/"))
    return value


def _remove_volumes(host_pod: HostPod) -> None:
    """The pod ended: its Secret files go with it."""
    if host_pod.volumes_dir is not None:
        shutil.rmtree(host_pod.volumes_dir, ignore_errors=True)
        host_pod.volumes_dir = None


def _field(pod: Mapping[str, Any], path: str, where: str) -> str:
    """The downward API's fields a worker may ask for."""
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": pod.get("status", {}).get("podIP", ""),
        "status.hostIP": pod.get("status", {}).get("hostIP", ""),
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise PodSpecError(f"{where}: fieldRef {path!r} is not supported here")


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _exit_code(returncode: int) -> int:
    """A shell's exit code: 128 + N for a process ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    """`python -m testbed.hostpods KUBECONFIG ROOT`: the runner as a process of its own (for
    `ci/testbed up --autoscaled-pool`, which exits while the pool runs); stops on SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m testbed.hostpods", description=__doc__)
    parser.add_argument("kubeconfig", type=Path)
    parser.add_argument("root", type=Path, help="folder of the processes' logs")
    args = parser.parse_args(argv)
    runner = HostPods(args.kubeconfig, args.root).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(5):
        for error in runner.errors:
            print(error, file=sys.stderr, flush=True)
        runner.errors.clear()
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
