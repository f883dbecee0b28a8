"""The chart's NetworkPolicies, enforced for real: kube-router's policy controller runs on the
test bed's node (jobtide_testbed.netpol) while the chart is installed with its policies on, and
real packets from inside pods' own network namespaces show who gets through. A pod without
the release's worker labels, and a pod with them in another namespace, are refused by the
broker's AMQP and management ports; a pod with the worker labels and the scaler get through,
and a worker Job the scaler creates does its tasks; the scaler's metrics port answers anyone
(what the chart says: Prometheus runs wherever the cluster puts it) while another port served
in the scaler's pod, or in a worker's, answers nobody but the node. With the policies turned
off everything is open again; once the agent stops, none of its chains or ipsets is left."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobtide_scaler.jobs import job_labels
from jobtide_testbed.chartnode import Helm, ReleaseBroker, diagnostics, write_values
from jobtide_testbed.kube import namespace_name
from jobtide_testbed.netpol import PolicyAgent, agent_footprint, listen_in, pod_ip, reach
from jobtide_testbed.node import PAUSE_IMAGE, Node
from jobtide_testbed.nodepods import create_pod, pool_pod, wait_phase
from jobtide_testbed.process import Process, wait_for
from jobtide_testbed.tools import CHART
from jobtide_worker.publisher import publish
from pytest_helm_charts.k8s.fixtures import NamespaceFactoryFunc
from test_chart_e2e import PIPELINE, QUEUE, e2e_values

pytestmark = pytest.mark.e2e

RELEASE = "netpol"
TASKS = 5
# A port the test serves inside the scaler's pod and a worker's pod (not the metrics port).
SERVED_PORT = 9000


def labelled_pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod that only holds a network namespace (the pause image) on the pool node."""
    manifest = pool_pod(name, PAUSE_IMAGE)
    manifest["metadata"]["labels"] = labels
    return manifest


def worker_labels(node: Node, namespace: str) -> dict[str, str]:
    """The labels of the pipeline's worker pods: the Job template's in the scaler's
    configuration, and those the scaler adds to each Job it creates."""
    config_map = json.loads(
        node.cluster.kubectl("get", "configmap", f"{RELEASE}-jobtide-scaler", "-n", namespace,
                             "-o", "json").stdout
    )  # fmt: skip
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    template = config["pipelines"][PIPELINE]["jobTemplate"]["spec"]["template"]
    return {**template["metadata"]["labels"], **job_labels(RELEASE, PIPELINE)}


def opened(results: dict[str, str]) -> dict[str, bool]:
    """Which targets took the connection (refused, reset or timed out: not)."""
    return {target: result == "open" for target, result in results.items()}


def test_chart_policies_admit_only_the_release_s_pods(
    kube_node: Node,
    chart_images: list[str],
    node_namespace: str,
    namespace_factory_function_scope: NamespaceFactoryFunc,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    cluster, ns = kube_node.cluster, node_namespace
    elsewhere = str(namespace_factory_function_scope(namespace_name("e2e", "netpol-other")).name)
    helm = Helm(cluster.kubeconfig, ns)
    listeners: list[Process] = []
    figures: dict[str, float] = {}
    looks: dict[str, dict[str, str]] = {}  # by source, the result at each target

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        figures[name] = now - since
        return now

    with PolicyAgent(kube_node) as agent:
        try:
            t = lap("agent start", began)
            values = e2e_values()
            values["networkPolicy"] = {"enabled": True}
            helm.install(RELEASE, [write_values(tmp_path / "values.yaml", values)])
            t = lap("install", t)

            broker = ReleaseBroker.find(cluster.kubeconfig, ns, RELEASE)
            scaler = json.loads(
                cluster.kubectl("get", "pods", "-n", ns, "-o", "json", "-l",
                                f"app.kubernetes.io/instance={RELEASE},"
                                "app.kubernetes.io/component=scaler").stdout
            )["items"][0]  # fmt: skip
            scaler_pod = scaler["metadata"]["name"]
            metrics_port = next(
                p["containerPort"]
                for p in scaler["spec"]["containers"][0]["ports"]
                if p["name"] == "metrics"
            )
            assert metrics_port != SERVED_PORT
            broker_pod = f"{RELEASE}-jobtide-rabbitmq-0"
            labels = worker_labels(kube_node, ns)
            create_pod(cluster, ns, labelled_pod("outsider", {"app": "outsider"}))
            create_pod(cluster, ns, labelled_pod("worker", labels))
            create_pod(cluster, elsewhere, labelled_pod("stranger", labels))
            for namespace, pod in ((ns, "outsider"), (ns, "worker"), (elsewhere, "stranger")):
                wait_phase(cluster, namespace, pod, ("Running",), timeout=60)
            policies = cluster.kubectl(
                "get", "networkpolicies", "-n", ns, "-o", "jsonpath={.items[*].metadata.name}"
            ).stdout.split()
            assert sorted(policies) == sorted(
                f"{RELEASE}-jobtide{suffix}" for suffix in ("-rabbitmq", "-scaler", "-workers")
            )
            pods = [broker_pod, scaler_pod, "outsider", "worker"]
            t = lap("pods", t)
            agent.wait_until_in_force(ns, pods, policies)
            t = lap("policies in force", t)
            # What the agent made of them, to be gone once it stops.
            chains, ipsets = agent_footprint()
            assert chains
            assert ipsets

            listeners += [
                listen_in(kube_node, ns, pod, SERVED_PORT, tmp_path)
                for pod in (scaler_pod, "worker")
            ]
            amqp = f"{broker.host}:{broker.amqp_port}"
            management = f"{broker.host}:{broker.management_port}"
            metrics = f"{pod_ip(kube_node, ns, scaler_pod)}:{metrics_port}"
            scaler_served = f"{pod_ip(kube_node, ns, scaler_pod)}:{SERVED_PORT}"
            worker_served = f"{pod_ip(kube_node, ns, 'worker')}:{SERVED_PORT}"
            everything = [amqp, management, metrics, scaler_served, worker_served]

            def look(source: str, namespace: str, pod: str | None) -> dict[str, bool]:
                looks[source] = reach(kube_node, namespace, pod, everything)
                return opened(looks[source])

            # The broker: the release's scaler and workers only. Metrics: anyone. Everything
            # else in the scaler's and workers' pods: nobody (but the node, as always).
            assert look("outsider", ns, "outsider") == {
                amqp: False, management: False, metrics: True, scaler_served: False,
                worker_served: False,
            }  # fmt: skip
            assert look("stranger", elsewhere, "stranger") == {
                amqp: False, management: False, metrics: True, scaler_served: False,
                worker_served: False,
            }  # fmt: skip
            assert look("worker", ns, "worker") == {
                amqp: True, management: True, metrics: True, scaler_served: False,
                worker_served: True,  # its own
            }  # fmt: skip
            assert look("scaler", ns, scaler_pod) == {
                amqp: True, management: True, metrics: True, scaler_served: True,  # its own
                worker_served: False,
            }  # fmt: skip
            assert look("node", ns, None) == dict.fromkeys(everything, True)
            t = lap("probes (policies on)", t)

            # A real worker Job, created by the scaler, reaches the broker through the
            # Service and does the tasks.
            publish(QUEUE, [{"seconds": 0.1}] * TASKS, broker=broker.config(), declare=False)

            def acked() -> int:
                return int(broker.queue(QUEUE).get("message_stats", {}).get("ack", 0))

            # The broker's statistics lag: the queue reads empty a moment after the acks count.
            wait_for(
                lambda: acked() >= TASKS and broker.depth(QUEUE) == 0,
                timeout=120,
                what="tasks done by a worker Job",
            )
            assert broker.depth(f"{QUEUE}.dlq") == 0
            t = lap("tasks done by a worker", t)

            helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set",
                 "networkPolicy.enabled=false", "--wait", "--timeout", "3m")  # fmt: skip
            no_policies = cluster.kubectl("get", "networkpolicies", "-n", ns, "-o", "name")
            assert no_policies.stdout.split() == []
            agent.wait_until_in_force(ns, pods, policies, present=False)
            t = lap("policies off", t)
            for source, namespace, pod in (
                ("outsider", ns, "outsider"),
                ("stranger", elsewhere, "stranger"),
                ("scaler", ns, scaler_pod),
            ):
                assert look(f"{source}, policies off", namespace, pod) == dict.fromkeys(
                    everything, True
                )
            lap("probes (policies off)", t)
        except BaseException:
            print("\n\n".join(diagnostics(cluster.kubeconfig, ns)))
            print(agent.process.tail(60))
            print("\n".join(r for r in agent.rules().splitlines() if "KUBE-" in r))
            print(json.dumps(looks, indent=1, sort_keys=True))
            raise
        finally:
            for listener in listeners:
                listener.stop()
            helm("uninstall", RELEASE, "--wait", check=False)
    # The machine is given back as found: no chain and no ipset of the agent is left.
    assert agent_footprint() == ([], [])
    print(f"\nthe agent's {len(chains)} chains and {len(ipsets)} ipsets were removed on stop")
    for source, results in looks.items():
        print(f"\n{source}: {json.dumps(results, sort_keys=True)}")
    steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in figures.items())
    print(f"\nnetwork policy run: {time.monotonic() - began:.0f} s ({steps})")
