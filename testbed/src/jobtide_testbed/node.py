"""A real Kubernetes node on this machine: containerd (CRI) with runc, CNI bridge networking,
kubelet, kube-proxy and CoreDNS as the cluster DNS, joined to a `KubeCluster`.

Everything the node makes lives under its `root` folder or carries the test bed's own names:
containerd has its own config, root, state and socket; kubelet its own root dir, pod log dir
and cgroup root; the pod network is the bridge `jobtide0` (10.88.0.0/16) with the host at
10.88.0.1. That address is the node's IP, the apiserver's advertise address (pods reach the
`kubernetes` Service through it), the kubelet's serving address and the cluster DNS address,
so no traffic ever leaves the machine. On the way out the machine is given back as it was
found: containers killed, mounts undone, bridge, iptables chains and cgroups removed,
sysctls and the fixed host paths kubelet writes restored.

One node may run on a machine at a time (the bridge, subnet and kube-proxy's chains are
machine-wide): `NodeHost` holds a lock for the node's lifetime and clears what a crashed
run left behind. The bridge comes first because the apiserver binds the node address;
`start_cluster_with_node(root)` does it all in order, `node.shutdown()` undoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.process import Process, free_port, run, wait_for
from jobtide_testbed.tools import BIN, CACHE, ensure_stage, tool

NODE_NAME = "jobtide-node"
BRIDGE = "jobtide0"
POD_CIDR = "10.88.0.0/16"
NODE_IP = "10.88.0.1"
CLUSTER_DOMAIN = "cluster.local"
# Like a node of an autoscaling pool reserved for batch work: only pods that tolerate the
# taint and select the label land here, which is what the chart's node-pool values set.
POOL_LABEL = ("jobtide.io/pool", "workers")
POOL_TAINT = {"key": "jobtide.io/pool", "value": "workers", "effect": "NoSchedule"}
PAUSE_IMAGE = "docker.io/jobtide-testbed/pause:1"
# containerd's content store under its root: blobs/<algorithm>/<encoded digest>.
CONTENT_STORE = "io.containerd.content.v1.content"
CGROUP_ROOT = "jobtide-testbed"
CNI_BIN_DIR = "/usr/lib/cni"
PAUSE_SOURCE = Path(__file__).with_name("pause") / "main.go"
# The node takes machine-wide things (bridge, iptables, /var/lib/kubelet), so its lock is
# machine-wide too: two sessions with different JOBTIDE_CACHE must not share the host.
LOCK_FILE = Path("/run/lock/jobtide-testbed-node.lock")
# How long a run waits for another run's node; a long benchmark beside other work may need more.
LOCK_TIMEOUT = float(os.environ.get("JOBTIDE_NODE_LOCK_TIMEOUT", "900"))
# Values kubelet and kube-proxy may change on start; restored on stop.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
IPTABLES_CHAIN_PREFIXES = ("KUBE-", "CNI-", "JOBTIDE-")
# The ipsets of the node's NetworkPolicy agent (jobtide_testbed.netpol), for IPv4 and IPv6.
IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")
# Fixed paths kubelet and the CNI library write to whatever their configuration says:
# entries that appear in them while the node runs are removed on release (and the folder
# itself if the node created it).
HOST_FOOTPRINT = (Path("/var/lib/kubelet"), Path("/var/lib/cni"), Path("/var/log/containers"))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check)


class NodeHost:
    """The machine-wide part of the node: lock, bridge, sysctl snapshot, leftovers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: IO[str] | None = None

    def acquire(self, timeout: float = LOCK_TIMEOUT) -> NodeHost:
        self.root.mkdir(parents=True, exist_ok=True)
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_FILE.open("a")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise TimeoutError(f"{LOCK_FILE}: another test bed node runs") from None
                time.sleep(1)
        self._lock = lock
        # We hold the lock, so whatever carries our names belongs to a run that crashed.
        clean_host(None)
        (self.root / "sysctls.json").write_text(json.dumps(read_sysctls()))
        (self.root / "footprint.json").write_text(json.dumps(_footprint()))
        make_cgroup_root()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        return self

    def keep_lock_in_background(self) -> int:
        """Hand the lock to a background process (for `ci/testbed up --node`, which exits
        while the node runs); returns its process group. Stopping it frees the lock."""
        assert self._lock is not None
        holder = subprocess.Popen(
            ["sleep", "infinity"],
            pass_fds=[self._lock.fileno()],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return holder.pid

    def release(self) -> None:
        clean_host(self.root)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class Node:
    """containerd + kubelet + kube-proxy + CoreDNS for one cluster, named `NODE_NAME`."""

    def __init__(self, cluster: KubeCluster, host: NodeHost, name: str = NODE_NAME) -> None:
        ensure_stage("node")
        self.cluster = cluster
        self.host = host
        self.name = name
        self.root = host.root / "node"
        self.logs = self.root / "logs"
        self.socket = self.root / "containerd" / "containerd.sock"
        # containerd's registry config_path: one folder per registry host, with its hosts.toml.
        self.registry_hosts = self.root / "containerd" / "certs.d"
        self.kubelet_port = free_port()
        self._write_config()
        self.containerd = Process(
            "containerd", ["containerd", "--config", str(self.root / "containerd.toml")], self.logs
        )
        self.kubelet = Process(
            "kubelet",
            [
                tool("kubelet"),
                f"--config={self.root / 'kubelet.yaml'}",
                f"--kubeconfig={self.root / 'kubelet.kubeconfig'}",
                f"--root-dir={self.root / 'kubelet'}",
                f"--hostname-override={name}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={POOL_LABEL[0]}={POOL_LABEL[1]}",
                "--v=1",
            ],
            self.logs,
        )
        self.kube_proxy = Process(
            "kube-proxy",
            [tool("kube-proxy"), f"--config={self.root / 'kube-proxy.yaml'}", "--v=1"],
            self.logs,
        )
        self.coredns = Process(
            "coredns", [tool("coredns"), "-conf", str(self.root / "Corefile")], self.logs
        )
        # Start-up times, for the benchmarks.
        self.control_plane_seconds: float | None = None
        self.startup_seconds: float | None = None

    @property
    def processes(self) -> list[Process]:
        return [self.containerd, self.kubelet, self.kube_proxy, self.coredns]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Node:
        began = time.monotonic()
        try:
            self._grant_coredns()
            self.coredns.start()
            self.containerd.start()
            wait_for(self._containerd_ready, timeout=30, what="containerd")
            self.load_image(self._pause_image_tar())
            self.kube_proxy.start()
            self.kubelet.start()
            wait_for(self._ready, timeout=120, what=f"node {self.name} Ready", interval=0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop every pod's containers while containerd still runs, then the daemons."""
        self.kubelet.stop(timeout=20)
        self.kube_proxy.stop()
        if self.containerd.running():
            kill_all_tasks(self.socket)
        self.containerd.stop(timeout=20)
        self.coredns.stop()

    def shutdown(self) -> None:
        """Stop the node, its control plane, and give the machine back (see NodeHost)."""
        try:
            self.stop()
            self.cluster.stop()
        finally:
            self.host.release()

    # -- images -------------------------------------------------------------------------
    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args], timeout=timeout
        )

    def trust_registry(self, host: str, hosts_toml: str) -> None:
        """Let containerd pull from registry `host` (address:port) as `hosts_toml` says (its
        CA, for one); read at each pull, so a running node takes it at once."""
        folder = self.registry_hosts / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(hosts_toml)

    def distrust_registry(self, host: str) -> None:
        """Undo `trust_registry(host)`."""
        shutil.rmtree(self.registry_hosts / host, ignore_errors=True)

    def images(self) -> set[str]:
        """The names of the images containerd holds for kubelet."""
        return set(self.ctr("images", "ls", "--quiet").stdout.split())

    def image_digest(self, name: str) -> str:
        """The digest of image `name`'s manifest (or index)."""
        rows = self.ctr("images", "ls", f"name=={name}").stdout.splitlines()[1:]
        if len(rows) != 1:
            raise LookupError(f"node {self.name}: no image {name} in containerd")
        # REF TYPE DIGEST SIZE PLATFORMS LABELS
        return rows[0].split()[2]

    def blob(self, digest: str) -> Path:
        """Where containerd keeps blob `digest` (sha256:...) on disk: its content store,
        read directly (the node runs as root on this machine)."""
        algorithm, _, encoded = digest.partition(":")
        return self.root / "containerd" / "root" / CONTENT_STORE / "blobs" / algorithm / encoded

    def blobs(self) -> set[str]:
        """The digests of every blob containerd holds for kubelet."""
        return set(self.ctr("content", "ls", "--quiet").stdout.split())

    def remove_images(self, *names: str) -> None:
        """Remove images `names` (those held) and the blobs only they needed (containerd's
        garbage collection, waited for); their snapshots go with the last container that
        used them."""
        held = sorted(self.images() & set(names))
        if held:
            self.ctr("images", "rm", "--sync", *held)

    def load_image(self, tar: Path) -> None:
        """Import a `docker save` tar into the node's containerd (where kubelet finds it)."""
        self.ctr("images", "import", "--no-unpack=false", str(tar))

    # -- host services for pods ---------------------------------------------------------
    def expose_host_port(
        self, namespace: str, name: str, *ports: int, target_host: str = "127.0.0.1"
    ) -> list[Process]:
        """Make loopback-only host `ports` (e.g. the test bed's RabbitMQ's AMQP and management
        ports) reachable from pods as Service `name`, each on its own number: a relay per port
        on the node address and a selector-less Service with its EndpointSlice. The caller
        stops the returned relays."""
        relays = {port: free_port() for port in ports}
        started = [
            Process(
                f"relay-{namespace}-{name}-{port}",
                [
                    "socat",
                    f"TCP-LISTEN:{relay_port},bind={NODE_IP},fork,reuseaddr",
                    f"TCP:{target_host}:{port}",
                ],
                self.logs,
            ).start()
            for port, relay_port in relays.items()
        ]
        self.cluster.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {
                        "ports": [
                            {"name": f"tcp-{port}", "port": port, "targetPort": relay_port}
                            for port, relay_port in relays.items()
                        ]
                    },
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{name}-host",
                        "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [
                        {"name": f"tcp-{port}", "port": relay_port, "protocol": "TCP"}
                        for port, relay_port in relays.items()
                    ],
                    "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
                },
            ]
        )
        return started

    # -- internals ----------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in (
            "containerd/root",
            "containerd/state",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "logs",
        ):
            (r / d).mkdir(parents=True, exist_ok=True)
        pki = self.cluster.pki
        kubelet_client = pki.issue(
            "node-client", common_name=f"system:node:{self.name}", organization="system:nodes"
        )
        kubelet_serving = pki.issue(
            "kubelet-serving",
            common_name=f"system:node:{self.name}",
            server=True,
            dns=(self.name,),
            ips=(NODE_IP,),
        )
        proxy_client = pki.issue("kube-proxy", common_name="system:kube-proxy")
        self.coredns_client = pki.issue("coredns", common_name="system:jobtide-testbed-coredns")
        self._kubeconfig(r / "kubelet.kubeconfig", kubelet_client.cert, kubelet_client.key)
        self._kubeconfig(r / "kube-proxy.kubeconfig", proxy_client.cert, proxy_client.key)
        self._kubeconfig(
            r / "coredns.kubeconfig", self.coredns_client.cert, self.coredns_client.key
        )

        self.registry_hosts.mkdir(parents=True, exist_ok=True)
        (r / "containerd.toml").write_text(
            CONTAINERD_CONFIG.format(
                registry_hosts=self.registry_hosts,
                root=r / "containerd" / "root",
                state=r / "containerd" / "state",
                socket=self.socket,
                pause=PAUSE_IMAGE,
                cni_bin=CNI_BIN_DIR,
                cni_conf=r / "cni" / "net.d",
            )
        )
        (r / "cni" / "net.d" / "10-jobtide.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "jobtide-testbed",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(r / "cni" / "ipam"),
                                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        # Pods get only the cluster's search domains: nothing may resolve off the machine.
        (r / "resolv.conf").write_text("")
        (r / "kubelet.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": NODE_IP,
                    "port": self.kubelet_port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": free_port(),
                    "tlsCertFile": str(kubelet_serving.cert),
                    "tlsPrivateKeyFile": str(kubelet_serving.key),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(pki.ca.cert)},
                    },
                    "authorization": {"mode": "Webhook"},
                    "containerRuntimeEndpoint": f"unix://{self.socket}",
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{CGROUP_ROOT}",
                    "clusterDomain": CLUSTER_DOMAIN,
                    "clusterDNS": [NODE_IP],
                    "resolvConf": str(r / "resolv.conf"),
                    "podLogsDir": str(r / "pod-logs"),
                    "failSwapOn": False,
                    "registerWithTaints": [POOL_TAINT],
                    # The disk is shared with the other engineers' work: never evict or collect
                    # images because of it (our images cannot be pulled back).
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "50Mi",
                        "nodefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                        "imagefs.available": "1%",
                    },
                    "serializeImagePulls": False,
                    "nodeStatusReportFrequency": "10s",
                    # How often kubelet syncs each pod, which is when it rewrites a mounted
                    # Secret's files after a change (its Secret cache follows a watch, so the
                    # sync is the whole delay): 1 min by default, 10 s here so the credential
                    # rotation test (tests/e2e/test_rotation.py) waits seconds, not minutes.
                    # A few more status checks per pod; no other behaviour depends on it.
                    "syncFrequency": "10s",
                }
            )
        )
        (r / "kube-proxy.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(r / "kube-proxy.kubeconfig")},
                    "mode": "iptables",
                    "hostnameOverride": self.name,
                    "clusterCIDR": POD_CIDR,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": f"127.0.0.1:{free_port()}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Zero leaves the host's conntrack settings alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"localhostNodePorts": False},
                }
            )
        )
        (r / "Corefile").write_text(
            COREFILE.format(
                domain=CLUSTER_DOMAIN, address=NODE_IP, kubeconfig=r / "coredns.kubeconfig"
            )
        )

    def _kubeconfig(self, path: Path, cert: Path, key: Path) -> None:
        self.cluster._write_kubeconfig(
            path, user={"client-certificate": str(cert), "client-key": str(key)}
        )

    def _grant_coredns(self) -> None:
        self.grant(
            "system:jobtide-testbed-coredns",
            [
                {
                    "apiGroups": [""],
                    "resources": ["services", "namespaces", "endpoints", "pods"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        )

    def grant(self, user: str, rules: list[dict[str, Any]]) -> None:
        """A ClusterRole named `user` with `rules`, bound to the user `user` (a node daemon
        that authenticates with a client certificate of that common name)."""
        self.cluster.apply(
            [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": user},
                    "rules": rules,
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": user},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": user,
                    },
                    "subjects": [
                        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                    ],
                },
            ]
        )

    def client_kubeconfig(self, name: str, user: str) -> Path:
        """A kubeconfig under the node's root, `<name>.kubeconfig`, for a daemon of the node
        that signs in as `user` with a client certificate from the cluster's CA."""
        pair = self.cluster.pki.issue(name, common_name=user)
        path = self.root / f"{name}.kubeconfig"
        self._kubeconfig(path, pair.cert, pair.key)
        return path

    def _pause_image_tar(self) -> Path:
        """A one-binary image made without docker: the binary is built from PAUSE_SOURCE
        and wrapped in the `docker save` layout that `ctr images import` reads."""
        digest = hashlib.sha256(PAUSE_SOURCE.read_bytes()).hexdigest()[:16]
        out = CACHE / "pause" / digest
        tar_path = out / "pause.tar"
        if tar_path.exists():
            return tar_path
        out.mkdir(parents=True, exist_ok=True)
        binary = out / "pause"
        run(
            ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(binary), str(PAUSE_SOURCE)],
            env={**os.environ, "CGO_ENABLED": "0"},
            timeout=300,
        )
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as t:
            info = t.gettarinfo(str(binary), arcname="pause")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with binary.open("rb") as f:
                t.addfile(info, f)
        layer_bytes = layer.getvalue()
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()],
                },
            }
        ).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps(
            [{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]
        ).encode()
        partial = out / "pause.tar.part"
        with tarfile.open(partial, mode="w") as t:
            for name, data in (
                ("layer.tar", layer_bytes),
                (config_name, config),
                ("manifest.json", manifest),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        partial.rename(tar_path)
        return tar_path

    def _containerd_ready(self) -> bool:
        self.containerd.check_alive()
        return (
            run(
                ["ctr", "--address", str(self.socket), "version"], check=False, timeout=10
            ).returncode
            == 0
        )

    def _ready(self) -> bool:
        for p in self.processes:
            p.check_alive()
        out = self.cluster.kubectl("get", "node", self.name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conds = json.loads(out.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def start_cluster_with_node(root: Path) -> Node:
    """A control plane whose apiserver pods can reach, with one real node; the caller
    calls `shutdown()` on the result."""
    ensure_stage("node")
    host = NodeHost(root).acquire()
    cluster = KubeCluster(root / "kube", advertise_address=NODE_IP)
    try:
        began = time.monotonic()
        cluster.start(kwok=False)
        node = Node(cluster, host)
        node.control_plane_seconds = time.monotonic() - began
        return node.start()
    except BaseException:
        cluster.stop()
        host.release()
        raise


def kill_all_tasks(socket: Path) -> None:
    """SIGKILL every container of the containerd at `socket` and delete its task, so the
    shims exit and the containers' cgroups empty."""
    ctr = ["ctr", "--address", str(socket), "--namespace", "k8s.io"]
    tasks = run([*ctr, "tasks", "list", "--quiet"], check=False, timeout=30).stdout.split()
    for task in tasks:
        run([*ctr, "tasks", "kill", "--all", "--signal", "SIGKILL", task], check=False, timeout=30)
    for task in tasks:
        with contextlib.suppress(TimeoutError):
            wait_for(
                functools.partial(_task_stopped, ctr, task), timeout=15, what=f"task {task} to stop"
            )
        run([*ctr, "tasks", "delete", "--force", task], check=False, timeout=30)


def _task_stopped(ctr: list[str], task: str) -> bool:
    out = run([*ctr, "tasks", "list"], check=False, timeout=30).stdout
    return not any(line.split()[:1] == [task] and "RUNNING" in line for line in out.splitlines())


# -- host clean-up ----------------------------------------------------------------------
def clean_host(root: Path | None) -> None:
    """Undo what a node did to the machine. Idempotent; with `root` also unmounts under it
    and restores the sysctls saved there. Safe only while holding the node lock."""
    if root is None:
        _kill_crashed_nodes()
    _kill_our_shims()
    if root is not None:
        _unmount_under(root)
        saved = root / "sysctls.json"
        if saved.exists():
            write_sysctls(json.loads(saved.read_text()))
        before = root / "footprint.json"
        if before.exists():
            _remove_new_entries(json.loads(before.read_text()))
    if (BIN_KUBE_PROXY := BIN / "kube-proxy").exists():
        run([str(BIN_KUBE_PROXY), "--cleanup"], check=False, timeout=60)
    remove_chains(IPTABLES_CHAIN_PREFIXES)
    remove_ipsets(IPSET_PREFIXES)
    ip("link", "delete", BRIDGE, check=False)
    _remove_cgroups()


def _footprint() -> dict[str, list[str] | None]:
    """Entries of each HOST_FOOTPRINT folder, down to two levels (None: no such folder)."""
    out: dict[str, list[str] | None] = {}
    for top in HOST_FOOTPRINT:
        if not top.is_dir():
            out[str(top)] = None
            continue
        entries = []
        for child in top.iterdir():
            entries.append(child.name)
            if child.is_dir() and not child.is_symlink():
                entries += [f"{child.name}/{c.name}" for c in child.iterdir()]
        out[str(top)] = entries
    return out


def _remove_new_entries(before: dict[str, list[str] | None]) -> None:
    now = _footprint()
    for top, entries in now.items():
        if entries is None:
            continue
        if before.get(top) is None:
            shutil.rmtree(top, ignore_errors=True)
            continue
        old = set(before[top] or ())
        for entry in sorted(set(entries) - old, key=len):
            path = Path(top) / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue


def _kill_crashed_nodes() -> None:
    """Every process of a node whose run died without stopping it (pytest killed, say): its
    kubelet would go on killing the next node's pods, which share the machine's paths."""
    processes = dict(_cmdlines())
    roots = crashed_node_roots(processes.values())
    for pid in processes_under(processes, roots):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    for root in roots:
        _unmount_under(Path(root))


def crashed_node_roots(cmdlines: Iterable[list[bytes]]) -> set[str]:
    """The host folders of the nodes whose kubelet or containerd still runs, known by their
    configuration files (`<host folder>/node/kubelet.yaml`, `.../node/containerd.toml`)."""
    markers = (b"/node/kubelet.yaml", b"/node/containerd.toml")
    return {
        arg.split(b"=", 1)[-1].removesuffix(marker).decode(errors="replace")
        for argv in cmdlines
        for arg in argv
        for marker in markers
        if arg.endswith(marker)
    }


def processes_under(processes: dict[int, list[bytes]], roots: set[str]) -> list[int]:
    """The processes started with a path under one of `roots` (a node's control plane, its
    kubelet, containerd, kube-proxy and CoreDNS)."""
    prefixes = [root.encode() + b"/" for root in roots]
    return [
        pid
        for pid, argv in processes.items()
        if any(prefix in arg for arg in argv for prefix in prefixes)
    ]


def _kill_our_shims() -> None:
    """containerd shims (and their containers) of a test bed containerd that is gone."""
    for pid, argv in _cmdlines():
        if (
            argv
            and argv[0].endswith(b"containerd-shim-runc-v2")
            and any(a.endswith(b"/node/containerd/containerd.sock") for a in argv)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _unmount_under(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            mounts.append(point)
    for point in sorted(set(mounts), key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)


def remove_chains(prefixes: tuple[str, ...]) -> None:
    """Remove every iptables chain (IPv4 and IPv6, every table) whose name starts with one of
    `prefixes`, and the rules of other chains that jump to them."""
    for save, cmd in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        dump = run([save], check=False).stdout
        table = ""
        ours: dict[str, list[str]] = {}
        jumps: list[tuple[str, str]] = []
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and line[1:].startswith(prefixes):
                ours.setdefault(table, []).append(line[1:].split()[0])
            elif line.startswith("-A ") and any(
                f"-j {p}" in line or f"-g {p}" in line for p in prefixes
            ):
                chain = line.split()[1]
                if not chain.startswith(prefixes):
                    jumps.append((table, line[3:]))
        for table, rule in jumps:
            run([cmd, "-t", table, "-D", *shlex.split(rule)], check=False)
        for table, chains in ours.items():
            for chain in chains:
                run([cmd, "-t", table, "-F", chain], check=False)
            for chain in chains:
                run([cmd, "-t", table, "-X", chain], check=False)


def ipsets() -> list[str]:
    """The names of the machine's ipsets (none when Debian's `ipset` is not installed)."""
    if shutil.which("ipset") is None:
        return []
    return run(["ipset", "list", "-n"], check=False).stdout.split()


def remove_ipsets(prefixes: tuple[str, ...]) -> None:
    """Destroy every ipset whose name starts with one of `prefixes` (after the rules that
    use them are gone: an ipset in use cannot be destroyed)."""
    for name in ipsets():
        if name.startswith(prefixes):
            run(["ipset", "destroy", name], check=False)


def _cgroup_hierarchies() -> list[Path]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(pre.split()[4]))
    return out


def make_cgroup_root() -> None:
    for h in _cgroup_hierarchies():
        (h / CGROUP_ROOT).mkdir(exist_ok=True)


def _remove_cgroups() -> None:
    """Kill what still runs in the node's cgroups (containers whose shim is gone), then
    remove the cgroups, deepest first."""
    for _ in range(50):
        pids = {
            int(p)
            for h in _cgroup_hierarchies()
            if (h / CGROUP_ROOT).is_dir()
            for procs in (h / CGROUP_ROOT).rglob("cgroup.procs")
            for p in procs.read_text().split()
        }
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.1)
    for h in _cgroup_hierarchies():
        top = h / CGROUP_ROOT
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        with contextlib.suppress(OSError):
            values[name] = path.read_text().strip()
    return values


def write_sysctls(values: dict[str, str]) -> None:
    for name, value in values.items():
        path = Path("/proc/sys") / name
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value + "\n")


CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # This machine denies lowering oom_score_adj (no CAP_SYS_RESOURCE), which runc would do
  # for sandboxes and Guaranteed pods: keep every score at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".registry]
    # Registries the node may pull from (trust_registry); none unless a test adds one.
    config_path = "{registry_hosts}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"""

# Answers only for the cluster domain and the Service reverse zone; any other name is
# refused rather than forwarded, so pods never resolve or reach anything off the machine.
COREFILE = """\
{domain}:53 96.10.in-addr.arpa:53 88.10.in-addr.arpa:53 {{
    bind {address}
    errors
    kubernetes {domain} 96.10.in-addr.arpa 88.10.in-addr.arpa {{
        kubeconfig {kubeconfig} testbed
        pods insecure
    }}
    cache 5
}}
"""
