"""Fixtures of the end-to-end tests: images built with the test bed's Docker engine and
loaded into the real node's containerd, and namespaces on the node's cluster."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from testbed.chartnode import load_chart_images
from testbed.images import HELLO_IMAGE, load_into, worker_images
from testbed.node import Node


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


@pytest.fixture
def node_namespace(kube_node: Node, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on the real node's cluster, deleted afterwards (without waiting)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    name = f"e2e-{base.strip('-')}-{secrets.token_hex(3)}"
    kube_node.cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kube_node.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
