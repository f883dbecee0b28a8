"""The worker base image and the hello example, built on the test bed's private Docker
engine and run as a user would: read-only root filesystem, numeric non-root user."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from jobtide_testbed.images import (
    HELLO_IMAGE,
    WORKER_IMAGE,
    DockerDaemon,
    ImageBuilder,
    image_facts,
    worker_images,
)
from jobtide_testbed.rabbitmq import wait_counts
from workerbed import WorkerBed, broker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(docker_daemon: DockerDaemon) -> ImageBuilder:
    builder = ImageBuilder(docker_daemon)
    worker_images(builder)
    return builder


def test_image_runs_as_a_numeric_user_with_labels_and_no_build_secret(
    images: ImageBuilder,
) -> None:
    assert image_facts(images.daemon, WORKER_IMAGE) == {
        "user": "10001:10001",
        "entrypoint": ["/opt/venv/bin/python", "-m", "jobtide_worker"],
        "title": "jobtide-worker",
        "uid": "10001",
        "secrets_left": "0",
    }


def test_hello_image_does_its_tasks_then_exits_once_the_queue_is_silent(
    images: ImageBuilder, bed: WorkerBed
) -> None:
    bed.publish({"id": "a", "seconds": 0.2}, {"id": "b", "seconds": 0.1}, {"seconds": 0})
    # Counted in the queue's statistics before the worker's first read.
    wait_counts(bed.broker, bed.queue, ready=3)
    env = broker_env(bed.broker)
    password = env.pop("JOBTIDE_BROKER_PASSWORD")
    argv = ["run", "--rm", "--network", "host", "--read-only", "--user", "10001"]
    for name, value in {
        **env,
        "JOBTIDE_QUEUE": bed.queue,
        # It leaves once the queue is silent, read from the management API (the image's
        # HTTP client), long before its idle timeout.
        "JOBTIDE_IDLE_TIMEOUT_SECONDS": "60",
        "JOBTIDE_BROKER_MANAGEMENT_PORT": str(bed.broker.management_port),
    }.items():
        argv += ["--env", f"{name}={value}"]
    # The password travels in the docker client's environment, not on its command line.
    os.environ["JOBTIDE_BROKER_PASSWORD"] = password
    try:
        result = images.daemon.docker(
            *argv, "--env", "JOBTIDE_BROKER_PASSWORD", HELLO_IMAGE, timeout=120, check=False
        )
    finally:
        del os.environ["JOBTIDE_BROKER_PASSWORD"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("outcome=done") == 3
    assert "reason=queue-silent" in output
    assert "queue counters unreadable" not in output
    assert password not in output
    wait_counts(bed.broker, bed.queue, ready=0, unacked=0)


def test_image_exports_to_a_tar_for_containerd(images: ImageBuilder, tmp_path: Path) -> None:
    tar = images.save(HELLO_IMAGE, tmp_path / "hello.tar")

    with tarfile.open(tar) as archive:
        names = archive.getnames()
    assert "manifest.json" in names
