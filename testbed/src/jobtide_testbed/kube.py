"""A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on, ServiceAccount
tokens), kube-controller-manager, kube-scheduler, and optionally kwok acting as the kubelet
of fake nodes so Job pods are scheduled, run and succeed.

Binaries come from ci/setup (`$JOBTIDE_CACHE/bin/current`). Everything listens on free
ports of 127.0.0.1 and keeps its data and logs under `root`.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from jobtide_testbed.pki import PKI
from jobtide_testbed.process import Process, free_port, wait_for
from jobtide_testbed.tools import api_client, ensure_stage, kubectl, tool

SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = tuple(
    f"{c}-controller"
    for c in (
        "job",
        "garbage-collector",
        "ttl-after-finished",
        "serviceaccount",
        "serviceaccount-token",
        "namespace",
        "root-ca-certificate-publisher",
        "deployment",
        "replicaset",
        "statefulset",
        "endpoints",
        "endpointslice",
        "pod-garbage-collector",
        "disruption",
        "clusterrole-aggregation",
        "node-lifecycle",
        "persistentvolumeclaim-protection",
        "persistentvolume-protection",
        # Binds a claim to a matching static PersistentVolume (no provisioner here).
        "persistentvolume-binder",
    )
)
KWOK_STAGES = Path(__file__).with_name("kwok") / "stages.yaml"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


def namespace_name(prefix: str, test_name: str) -> str:
    """A fresh namespace name for a test: `prefix`, the test's name made DNS-safe, a random
    suffix (a name no earlier test used, even one still being deleted)."""
    base = "".join(c if c.isalnum() else "-" for c in test_name.lower())[:40].strip("-")
    return f"{prefix}-{base}-{secrets.token_hex(3)}"


class KubeCluster:
    """The control plane. `start()` brings it up; `kubeconfig` is an admin kubeconfig."""

    def __init__(self, root: Path, *, advertise_address: str = "127.0.0.1") -> None:
        ensure_stage("kube")
        self.root = root
        self.logs = root / "logs"
        self.advertise_address = advertise_address
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.apiserver_port = free_port()
        # The apiserver listens on its advertise address only: loopback by default, the
        # real node's address when pods must reach it (node.py).
        self.server = f"https://{advertise_address}:{self.apiserver_port}"
        self.pki = PKI(root / "pki")
        self.kubeconfig = root / "admin.kubeconfig"
        self._make_credentials()
        self.etcd = Process("etcd", self._etcd_argv(), self.logs)
        self.apiserver = Process("kube-apiserver", self._apiserver_argv(), self.logs)
        self.controller_manager = Process(
            "kube-controller-manager", self._controller_manager_argv(), self.logs
        )
        self.scheduler = Process("kube-scheduler", self._scheduler_argv(), self.logs)
        self.kwok: Process | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, *, kwok: bool = True) -> KubeCluster:
        self.etcd.start()
        wait_for(self._etcd_healthy, timeout=30, what="etcd")
        self.start_apiserver()
        self.controller_manager.start()
        self.scheduler.start()
        if kwok:
            self.kwok = Process("kwok", self._kwok_argv(), self.logs)
            self.kwok.start()
        wait_for(
            self._default_service_account_exists,
            timeout=60,
            what="default ServiceAccount (controller-manager)",
        )
        return self

    def start_apiserver(self) -> None:
        self.apiserver.start()
        wait_for(self._apiserver_ready, timeout=90, what="kube-apiserver /readyz", interval=0.5)

    def restart_apiserver(self) -> None:
        self.apiserver.stop()
        self.start_apiserver()

    def restart_etcd(self) -> None:
        """Stop etcd and start it again on its data; returns once the apiserver is ready on
        it again."""
        self.etcd.stop()
        self.etcd.start()
        wait_for(self._etcd_healthy, timeout=30, what="etcd after its restart")
        wait_for(self._apiserver_ready, timeout=90, what="kube-apiserver /readyz", interval=0.5)

    def stop(self) -> None:
        for p in (self.kwok, self.scheduler, self.controller_manager, self.apiserver, self.etcd):
            if p is not None:
                p.stop()

    @property
    def processes(self) -> list[Process]:
        procs = [self.etcd, self.apiserver, self.controller_manager, self.scheduler]
        return procs + ([self.kwok] if self.kwok else [])

    # -- clients ------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        check: bool = True,
        stdin: str | None = None,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        return kubectl(
            kubeconfig or self.kubeconfig, *args, check=check, stdin=stdin, timeout=timeout
        )

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]] | str) -> None:
        text = (
            manifest
            if isinstance(manifest, str)
            else yaml.safe_dump_all(manifest if isinstance(manifest, list) else [manifest])
        )
        self.kubectl("apply", "--server-side", "-f", "-", stdin=text)

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """An official-client ApiClient for the admin (or for `kubeconfig`)."""
        return api_client(kubeconfig or self.kubeconfig)

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token for a ServiceAccount, through the TokenRequest API."""
        out = self.kubectl(
            "create", "token", name, "-n", namespace, "--duration", f"{seconds}s"
        ).stdout
        return str(out).strip()

    def kubeconfig_for_token(self, token: str, path: Path, *, server: str | None = None) -> Path:
        """A kubeconfig acting as the owner of `token` (e.g. a ServiceAccount), talking to
        `server` if given (a proxy in front of the apiserver) instead of the apiserver."""
        self._write_kubeconfig(path, user={"token": token}, server=server)
        return path

    def add_fake_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        """A Node that kwok plays the kubelet of: its pods start at once and Job pods
        succeed after a short delay (see kwok/stages.yaml)."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {"kubernetes.io/hostname": name, "type": "kwok", **(labels or {})},
                },
                "spec": {"taints": taints or []},
            }
        )
        wait_for(lambda: self._node_ready(name), timeout=30, what=f"fake node {name}")

    # -- internals ----------------------------------------------------------------------
    def _make_credentials(self) -> None:
        p = self.pki
        self.serving = p.issue(
            "apiserver",
            common_name="kube-apiserver",
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=("127.0.0.1", "10.96.0.1", self.advertise_address),
        )
        self.admin = p.issue("admin", common_name="testbed-admin", organization="system:masters")
        self.kubelet_client = p.issue(
            "apiserver-kubelet-client",
            common_name="kube-apiserver-kubelet-client",
            organization="system:masters",
        )
        self.sa_keys = p.service_account_keys()
        self._write_kubeconfig(
            self.kubeconfig,
            user={"client-certificate": str(self.admin.cert), "client-key": str(self.admin.key)},
        )

    def _write_kubeconfig(
        self, path: Path, *, user: dict[str, str], server: str | None = None
    ) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "testbed",
            "clusters": [
                {
                    "name": "testbed",
                    "cluster": {
                        "server": server or self.server,
                        "certificate-authority": str(self.pki.ca.cert),
                    },
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "user"}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            tool("etcd"),
            "--name",
            "testbed",
            "--data-dir",
            str(self.root / "etcd"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"testbed={peer}",
            "--listen-metrics-urls",
            "",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        p = self.pki
        return [
            tool("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.advertise_address}",
            f"--secure-port={self.apiserver_port}",
            f"--advertise-address={self.advertise_address}",
            f"--tls-cert-file={self.serving.cert}",
            f"--tls-private-key-file={self.serving.key}",
            f"--client-ca-file={p.ca.cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_keys.cert}",
            f"--service-account-signing-key-file={self.sa_keys.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={self.kubelet_client.cert}",
            f"--kubelet-client-key={self.kubelet_client.key}",
            f"--kubelet-certificate-authority={p.ca.cert}",
            # A real kubelet's node name does not resolve: reach it by its IP.
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_flags(self) -> list[str]:
        """What controller-manager and scheduler share: admin credentials, a private
        loopback port for their own HTTPS endpoint, and no leader election (one replica)."""
        kc = str(self.kubeconfig)
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _controller_manager_argv(self) -> list[str]:
        return [
            tool("kube-controller-manager"),
            *self._controller_flags(),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.sa_keys.key}",
            f"--root-ca-file={self.pki.ca.cert}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--concurrent-job-syncs=10",
            "--concurrent-ttl-after-finished-syncs=10",
        ]

    def _scheduler_argv(self) -> list[str]:
        return [tool("kube-scheduler"), *self._controller_flags()]

    def _kwok_argv(self) -> list[str]:
        return [
            tool("kwok"),
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--config={KWOK_STAGES}",
            "--server-address=127.0.0.1:0",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.244.0.1",
        ]

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return ctx

    def _get(self, path: str) -> tuple[int, bytes]:
        # The URL is ours: https to the test bed's apiserver.
        with urllib.request.urlopen(self.server + path, context=self._ssl(), timeout=5) as r:  # noqa: S310
            return int(r.status), r.read()

    def _etcd_healthy(self) -> bool:
        self.etcd.check_alive()
        url = f"http://127.0.0.1:{self.etcd_port}/health"
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(json.loads(r.read()).get("health") == "true")

    def _apiserver_ready(self) -> bool:
        self.apiserver.check_alive()
        return self._get("/readyz")[0] == 200

    def _default_service_account_exists(self) -> bool:
        self.controller_manager.check_alive()
        code, _ = self._get("/api/v1/namespaces/default/serviceaccounts/default")
        return code == 200

    def _node_ready(self, name: str) -> bool:
        _, body = self._get(f"/api/v1/nodes/{name}")
        conds = json.loads(body).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
