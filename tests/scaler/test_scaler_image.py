"""The scaler image, built on the test bed's private Docker engine and run as the chart runs
it: numeric non-root user, read-only root filesystem, `--config FILE` as the arguments, the
chart's ServiceAccount token, against the test bed's control plane and RabbitMQ."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from jobtide_testbed.images import (
    SCALER_IMAGE,
    DockerDaemon,
    ImageBuilder,
    image_facts,
    scaler_image,
)
from scaler_bed import ScalerBed, pipeline

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(docker_daemon: DockerDaemon) -> ImageBuilder:
    builder = ImageBuilder(docker_daemon)
    scaler_image(builder)
    return builder


def test_image_metadata_and_user(images: ImageBuilder) -> None:
    assert image_facts(images.daemon, SCALER_IMAGE) == {
        "user": "10001:10001",
        "entrypoint": ["/opt/venv/bin/python", "-m", "jobtide_scaler"],
        "title": "jobtide-scaler",
        "uid": "10001",
        "secrets_left": "0",
    }
    # No sources beside the installed package.
    assert (
        "No such file"
        in images.daemon.docker(
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/ls",
            SCALER_IMAGE,
            "/src",
            check=False,
        ).stderr
    )


def test_image_scales_a_pipeline_read_only_as_the_charts_service_account(
    images: ImageBuilder, bed: ScalerBed, tmp_path: Path
) -> None:
    queue = f"{bed.namespace}-image"
    bed.publish(queue, 2)
    mount = tmp_path / "mount"
    mount.mkdir()
    mount.chmod(0o755)
    # The container's user reads these: the CA as a file, as in a pod (inline CA data would
    # make the client write a temporary file, and there is no writable /tmp here), a
    # kubeconfig with the ServiceAccount token, and the configuration.
    token = yaml.safe_load(bed.kubeconfig.read_text())["users"][0]["user"]["token"]
    (mount / "ca.crt").write_bytes(bed.kube.pki.ca.cert.read_bytes())
    ca = "/etc/jobtide/ca.crt"
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [
            {"name": "c", "cluster": {"server": bed.kube.server, "certificate-authority": ca}}
        ],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }
    (mount / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    config = yaml.safe_load(bed.config({"image": pipeline(queue)}).read_text())
    config["metrics"] = {"port": 0}
    (mount / "config.yaml").write_text(yaml.safe_dump(config))
    for path in mount.iterdir():
        path.chmod(0o644)

    env = bed.env(0)
    password = env["JOBTIDE_BROKER_PASSWORD"]
    argv = [
        "run",
        "--rm",
        "--read-only",
        "--network",
        "host",
        "--user",
        "10001",
        "--volume",
        f"{mount}:/etc/jobtide:ro",
        "--env",
        "KUBECONFIG=/etc/jobtide/kubeconfig",
    ]
    for name in ("HOST", "PORT", "MANAGEMENT_PORT", "VHOST", "USERNAME"):
        argv += ["--env", f"JOBTIDE_BROKER_{name}={env[f'JOBTIDE_BROKER_{name}']}"]
    # The password travels in the docker client's environment, not on its command line.
    os.environ["JOBTIDE_BROKER_PASSWORD"] = password
    try:
        result = images.daemon.docker(
            *argv,
            "--env",
            "JOBTIDE_BROKER_PASSWORD",
            SCALER_IMAGE,
            "--config",
            "/etc/jobtide/config.yaml",
            "--once",
            timeout=180,
            check=False,
        )
    finally:
        del os.environ["JOBTIDE_BROKER_PASSWORD"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "created 2 of 2 Job(s) for pipeline image" in output
    assert password not in output
    assert len(bed.jobs("image")) == 2
