"""Outcome of a create call under network faults a real apiserver cannot produce on demand:
a server that takes the request and never answers, a closed port, error statuses."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jobtide_scaler.cluster import Cluster, CreateOutcome
from kubernetes import client as k8s

pytestmark = pytest.mark.unit

MANIFEST = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"generateName": "x-"},
    "spec": {"template": {"spec": {"containers": []}}},
}


class Behaviour:
    status = 201
    hang = threading.Event()
    release = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if Behaviour.hang.is_set():
            Behaviour.release.wait(10)
            return
        body = b'{"metadata": {"name": "x-abcde"}}' if Behaviour.status == 201 else b"{}"
        self.send_response(Behaviour.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Behaviour.status = 201
    Behaviour.hang.clear()
    Behaviour.release.clear()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        Behaviour.release.set()
        httpd.shutdown()
        httpd.server_close()


def cluster_for(url: str) -> Cluster:
    configuration = k8s.Configuration(host=url)
    configuration.retries = False
    return Cluster(k8s.ApiClient(configuration), "jobs", "x=y", create_timeout=(1.0, 0.5))


def test_created(server: str) -> None:
    result = cluster_for(server).create_job(MANIFEST)
    assert (result.outcome, result.name) == (CreateOutcome.CREATED, "x-abcde")


def test_no_answer_is_unknown(server: str) -> None:
    Behaviour.hang.set()
    assert cluster_for(server).create_job(MANIFEST).outcome is CreateOutcome.UNKNOWN


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (429, CreateOutcome.REJECTED),
        (403, CreateOutcome.REJECTED),
        (500, CreateOutcome.UNKNOWN),
        (503, CreateOutcome.UNKNOWN),
        (504, CreateOutcome.UNKNOWN),
    ],
)
def test_statuses(server: str, status: int, outcome: CreateOutcome) -> None:
    Behaviour.status = status
    assert cluster_for(server).create_job(MANIFEST).outcome is outcome


def test_closed_port_is_a_definite_refusal() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = cluster_for(f"http://127.0.0.1:{port}").create_job(MANIFEST)
    assert result.outcome is CreateOutcome.REJECTED, result.reason
