"""The real node's NetworkPolicy agent: kube-router's network policy controller, and a way to
send real packets from inside a pod's own network namespace.

Only kube-router's firewall runs (no routing, no service proxy: the node's bridge and
kube-proxy stay as they are). It watches the node's cluster as a user of its own with
read-only rights and turns each NetworkPolicy into iptables chains (`KUBE-ROUTER-*`,
`KUBE-NWPLCY-*`, `KUBE-POD-FW-*`) and ipsets (`KUBE-SRC-*`, `KUBE-DST-*`); the node's bridge
passes packets between pods through iptables (bridge netfilter), so they meet those rules.
Traffic from the node itself (kubelet probes, the test bed reaching a pod from the host) is
always let through, as kube-router does on every node. While it runs, a connection to a
Service address without endpoints is dropped on its way out (`GUARD_CHAIN`), never sent off the
machine. On stop, every chain and ipset it made is removed and the machine is as it was. It
runs only beside a running `Node` (whose lock covers the machine's iptables).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jobtide_testbed.kube import SERVICE_CIDR
from jobtide_testbed.node import IPSET_PREFIXES, Node, ipsets, remove_chains, remove_ipsets
from jobtide_testbed.process import Process, run, wait_for
from jobtide_testbed.tools import ensure_stage, tool

AGENT_USER = "system:jobtide-testbed-kube-router"
# A pod's connection to a Service address that no endpoint backs is refused by kube-proxy's
# filter rules, but kube-router accepts the pod's traffic before they see it, and the packet would
# leave the machine by its default route. This chain drops it on the way out instead.
GUARD_CHAIN = "JOBTIDE-SVC-GUARD"
CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-NWPLCY-", "KUBE-POD-FW-", GUARD_CHAIN)
# Named while kube-router swaps a set's members in; removed on stop if one was left.
SWAP_IPSET_PREFIXES = ("TMP-", "inet6:TMP-")
# What the controller watches (kube-router starts informers for all of them) and nothing more.
AGENT_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["namespaces", "pods", "services", "endpoints", "nodes"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["get", "list", "watch"],
    },
]


def agent_footprint() -> tuple[list[str], list[str]]:
    """kube-router's iptables chains (IPv4 and IPv6) and ipsets on the machine now."""
    chains = [
        line[1:].split()[0]
        for save in ("iptables-save", "ip6tables-save")
        for line in run([save], check=False).stdout.splitlines()
        if line.startswith(":") and line[1:].startswith(CHAIN_PREFIXES)
    ]
    sets = [s for s in ipsets() if s.startswith(IPSET_PREFIXES + SWAP_IPSET_PREFIXES)]
    return sorted(chains), sorted(sets)


class PolicyAgent:
    """kube-router's network policy controller for `node`; a context manager."""

    def __init__(self, node: Node) -> None:
        self.node = node
        ensure_stage("kube-router")  # kube-router and Debian's ipset
        binary = tool("kube-router")
        kubeconfig = node.client_kubeconfig("kube-router", AGENT_USER)
        self.process = Process(
            "kube-router",
            [
                binary,
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={node.name}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # No health or metrics listener: nothing of it listens on the machine.
                "--health-port=0",
                "--metrics-port=0",
                "--v=1",
            ],
            node.logs,
        )
        self.startup_seconds: float | None = None

    def start(self) -> PolicyAgent:
        left = agent_footprint()
        if left != ([], []):
            raise RuntimeError(f"kube-router's chains and ipsets are already here: {left}")
        self.node.grant(AGENT_USER, AGENT_RULES)
        try:
            iptables = ["iptables", "-t", "mangle"]
            run([*iptables, "-N", GUARD_CHAIN])
            run([*iptables, "-A", GUARD_CHAIN, "-d", SERVICE_CIDR, "-j", "DROP"])
            run([*iptables, "-I", "POSTROUTING", "1", "-j", GUARD_CHAIN])
            self.process.start()
            wait_for(self._running, timeout=60, what="kube-router's firewall", interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop kube-router and remove every chain and ipset it made (rules before sets: a
        set in use cannot be destroyed)."""
        self.process.stop()
        remove_chains(CHAIN_PREFIXES)
        remove_ipsets(IPSET_PREFIXES + SWAP_IPSET_PREFIXES)

    def __enter__(self) -> PolicyAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rules(self) -> str:
        """The machine's iptables filter table (IPv4), as iptables-save prints it."""
        return str(run(["iptables-save", "-t", "filter"]).stdout)

    def missing(
        self, namespace: str, pods: list[str], policies: list[str], *, present: bool = True
    ) -> list[str]:
        """What the rules on the machine lack for every one of `pods` (of `namespace`) to
        pass its firewall and for the rules of every one of `policies` to be there (for none
        of them to be there, when not `present`); empty when the agent has caught up."""
        self.process.check_alive()
        rules = self.rules()
        lacking = [f"pod {p}" for p in pods if f"POD name:{p} namespace: {namespace} " not in rules]
        for p in policies:
            if (f'"run through nw policy {p}"' in rules) != present:
                lacking.append(f"policy {p} {'in' if present else 'out of'} force")
        return lacking

    def wait_until_in_force(
        self, namespace: str, pods: list[str], policies: list[str], *, present: bool = True
    ) -> None:
        """Wait until `missing(...)` is empty; the timeout names what is still missing."""

        def caught_up() -> bool:
            lacking = self.missing(namespace, pods, policies, present=present)
            if lacking:
                raise LookupError(", ".join(lacking))
            return True

        wait_for(caught_up, timeout=60, what="kube-router's rules", interval=0.5)

    def _running(self) -> bool:
        self.process.check_alive()
        return any(c.startswith("KUBE-ROUTER-FORWARD") for c in agent_footprint()[0])


# Run in a pod's network namespace with the host's Python: tries each target and prints one
# JSON object, target -> "open", "refused", "timeout" or the error's name.
REACH = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=float(sys.argv[2])).close()
        out[target] = "open"
    except ConnectionRefusedError:
        out[target] = "refused"
    except TimeoutError:
        out[target] = "timeout"
    except OSError as error:
        out[target] = type(error).__name__
print(json.dumps(out))
"""

# Run in a pod's network namespace: accepts and closes connections on a port until stopped.
LISTEN = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    server.accept()[0].close()
"""


def pod_pid(node: Node, namespace: str, pod: str) -> int:
    """The host PID of the first container of a running pod (its network namespace is the
    pod's)."""
    status = json.loads(
        node.cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout
    )["status"]
    container = status["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container:
            return int(pid)
    raise LookupError(f"no running task for pod {namespace}/{pod} ({container})")


def netns_argv(node: Node, namespace: str, pod: str, *argv: str) -> list[str]:
    """`argv` run on the host inside the network namespace of pod `namespace/pod`."""
    return ["nsenter", f"--net=/proc/{pod_pid(node, namespace, pod)}/ns/net", *argv]


def reach(
    node: Node, namespace: str, pod: str | None, targets: list[str], timeout: float = 3
) -> dict[str, str]:
    """Connect from pod `namespace/pod` (the node itself when None) to each `host:port` of
    `targets`: "open", "refused" (a reset or an ICMP reject, which is how kube-router
    refuses), "timeout" or an error's name, by target."""
    argv = [sys.executable, "-c", REACH, json.dumps(targets), str(timeout)]
    if pod is not None:
        argv = netns_argv(node, namespace, pod, *argv)
    found: dict[str, str] = json.loads(run(argv, timeout=30 + timeout * len(targets)).stdout)
    return found


def listen_in(node: Node, namespace: str, pod: str, port: int, log_dir: Path) -> Process:
    """A listener on `port` in pod `namespace/pod`'s network namespace (as if the pod served
    it), started and answering the node; the caller stops it."""
    argv = netns_argv(node, namespace, pod, sys.executable, "-c", LISTEN, str(port))
    listener = Process(f"listen-{pod}-{port}", argv, log_dir).start()
    target = f"{pod_ip(node, namespace, pod)}:{port}"

    def answers() -> bool:
        listener.check_alive()
        return reach(node, namespace, None, [target]) == {target: "open"}

    try:
        wait_for(answers, timeout=30, what=f"a listener on {pod}:{port}")
    except BaseException:
        listener.stop()
        raise
    return listener


def pod_ip(node: Node, namespace: str, pod: str) -> str:
    jsonpath = "jsonpath={.status.podIP}"
    out = node.cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", jsonpath).stdout
    return str(out).strip()
