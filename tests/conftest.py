"""Fixtures of the test bed. Every service is started once per session on free loopback
ports and stopped at the end; component logs are printed when a test that used them fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jobtide_testbed.images import DockerDaemon
from jobtide_testbed.kube import KubeCluster, namespace_name
from jobtide_testbed.node import Node, start_cluster_with_node
from jobtide_testbed.pki import PKI
from jobtide_testbed.rabbitmq import FLOOR, NEWEST, BrokerRelease, BrokerTls, RabbitMQ, broker_tls
from jobtide_testbed.registry import Registry

# Log files of the components started in this session, printed under failed tests.
_component_logs: list[Path] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test with a broker runs on the newest RabbitMQ; the compatibility set (marker
    `broker_compat`) also on the oldest the chart supports. Session-scoped, so each release's
    shared node starts once and pytest groups the tests by release."""
    if "broker_release" not in metafunc.fixturenames:
        return
    compat = metafunc.definition.get_closest_marker("broker_compat") is not None
    releases = [NEWEST, FLOOR] if compat else [NEWEST]
    metafunc.parametrize(
        "broker_release",
        releases,
        ids=[f"rabbitmq-{r.version}" for r in releases],
        indirect=True,
        scope="session",
    )


@pytest.fixture(scope="session")
def broker_release(request: pytest.FixtureRequest) -> BrokerRelease:
    """The RabbitMQ release this test's brokers run (see pytest_generate_tests)."""
    release: BrokerRelease = request.param
    return release


@pytest.fixture(scope="session")
def rabbitmq(
    tmp_path_factory: pytest.TempPathFactory, broker_release: BrokerRelease
) -> Iterator[RabbitMQ]:
    """One RabbitMQ node per release shared by the session. Tests use their own queue names;
    tests that restart or reconfigure a broker take a private one from `rabbitmq_factory`."""
    node = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"), name="shared", release=broker_release)
    _component_logs.append(node.log_path)
    try:
        yield node.start()
    finally:
        node.close()


@pytest.fixture(scope="session")
def broker_pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerTls:
    """A test CA and the broker's server certificate for TLS_HOST (plain listeners kept)."""
    return broker_tls(tmp_path_factory.mktemp("broker-pki"), plain=True)


@pytest.fixture(scope="session")
def untrusted_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA bundle that did not sign the broker's certificate."""
    return PKI(tmp_path_factory.mktemp("untrusted-pki")).ca.cert


@pytest.fixture(scope="session")
def rabbitmq_tls(
    broker_pki: BrokerTls, tmp_path_factory: pytest.TempPathFactory, broker_release: BrokerRelease
) -> Iterator[RabbitMQ]:
    """One RabbitMQ node per release with TLS listeners (AMQPS, management HTTPS) beside its
    plain ones, shared by the session: clients under test reach it over TLS
    (`tls_client_env`); the plain listeners let a test look at what they did, or aim TLS at
    a port that does not speak it. A TLS-only node: `rabbitmq_factory(tls=...)`."""
    node = RabbitMQ(
        tmp_path_factory.mktemp("rabbitmq-tls"), name="tls", release=broker_release, tls=broker_pki
    )
    _component_logs.append(node.log_path)
    try:
        yield node.start()
    finally:
        node.close()


@pytest.fixture
def rabbitmq_factory(
    tmp_path_factory: pytest.TempPathFactory, broker_release: BrokerRelease
) -> Iterator[Callable[..., RabbitMQ]]:
    """Start private RabbitMQ nodes of the test's release (keyword arguments as for
    RabbitMQ); stopped after the test."""
    nodes: list[RabbitMQ] = []

    def make(**kwargs: object) -> RabbitMQ:
        kwargs.setdefault("release", broker_release)
        node = RabbitMQ(tmp_path_factory.mktemp("rabbitmq-private"), **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        _component_logs.append(node.log_path)
        return node.start()

    try:
        yield make
    finally:
        for node in nodes:
            node.close()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A real control plane (RBAC on) with one kwok fake node, `kwok-node-0`, on which Job
    pods run and succeed (testbed/src/jobtide_testbed/kwok/stages.yaml)."""
    cluster = KubeCluster(tmp_path_factory.mktemp("kube"))
    _component_logs.extend(
        p.log_path
        for p in (cluster.etcd, cluster.apiserver, cluster.controller_manager, cluster.scheduler)
    )
    try:
        cluster.start()
        assert cluster.kwok is not None
        _component_logs.append(cluster.kwok.log_path)
        cluster.add_fake_node("kwok-node-0")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A second control plane, separate from `kube`, with one real node (jobtide_testbed.node:
    containerd, kubelet, kube-proxy, CoreDNS) that runs containers; its apiserver listens
    on the node address so pods reach it. `kube_node.cluster` is its KubeCluster."""
    node = start_cluster_with_node(tmp_path_factory.mktemp("kube-node"))
    _component_logs.extend(p.log_path for p in node.cluster.processes + node.processes)
    try:
        yield node
    finally:
        node.shutdown()


@pytest.fixture(scope="module")
def kube_config(kube: KubeCluster) -> str:
    """pytest-helm-charts' cluster (`kube_cluster`) is the test bed's control plane."""
    return str(kube.kubeconfig)


@pytest.fixture
def namespace(kube: KubeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards without waiting: dozens of short
    tests share this control plane, and the deletion finishes while the next ones run
    (pytest-helm-charts' namespace factory waits for it; the real node's tests use that)."""
    name = namespace_name("t", request.node.name)
    kube.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    uses_testbed = any(item.get_closest_marker(m) for m in ("integration", "e2e", "bench"))
    if report.failed and uses_testbed:
        for path in dict.fromkeys(_component_logs):
            try:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            except FileNotFoundError:
                continue
            report.sections.append((f"log tail: {path}", tail))
    return report


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    """The test bed's private Docker engine, one for the session (images stay cached): a
    second one in the same session would wait for the first one's lock."""
    with DockerDaemon() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The test bed's OCI registry (TLS from its own CA, one user with a password), shared by
    the session: tests push under repository names of their own."""
    with Registry(tmp_path_factory.mktemp("registry")) as started:
        _component_logs.append(started.log_path)
        yield started
