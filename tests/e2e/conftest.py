"""Fixtures of the end-to-end tests: images built with the test bed's Docker engine and
loaded into the real node's containerd, and namespaces on the node's cluster (through
pytest-helm-charts, whose `kube_cluster` is the node's cluster here)."""

from __future__ import annotations

import pytest
from jobtide_testbed.chartnode import load_chart_images
from jobtide_testbed.images import HELLO_IMAGE, load_into, worker_images
from jobtide_testbed.kube import namespace_name
from jobtide_testbed.node import Node
from pytest_helm_charts.k8s.fixtures import NamespaceFactoryFunc


@pytest.fixture(scope="session")
def node_images(kube_node: Node, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The worker images (base and the hello example) on the node; values are the names
    pods use."""
    load_into(kube_node.load_image, worker_images, tmp_path_factory.mktemp("images"))
    return {"hello": HELLO_IMAGE}


@pytest.fixture(scope="session")
def chart_images(kube_node: Node, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every image the chart runs (scaler, worker, hello, Debian's RabbitMQ) on the node."""
    return load_chart_images(kube_node.load_image, tmp_path_factory.mktemp("chart-images"))


@pytest.fixture(scope="module")
def kube_config(kube_node: Node) -> str:
    """pytest-helm-charts' cluster (`kube_cluster`) is the real node's cluster."""
    return str(kube_node.cluster.kubeconfig)


@pytest.fixture
def node_namespace(
    namespace_factory_function_scope: NamespaceFactoryFunc, request: pytest.FixtureRequest
) -> str:
    """A fresh namespace on the real node's cluster, deleted after the test and waited for
    (so the next test starts on a node whose pods are gone)."""
    namespace = namespace_factory_function_scope(namespace_name("e2e", request.node.name))
    return str(namespace.name)
