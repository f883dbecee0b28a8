"""Run the chart's RabbitMQ configuration outside Kubernetes: the init container's script on
the rendered files, then a real RabbitMQ node on what it produced."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from chartlib import find
from jobtide_testbed.process import free_port
from jobtide_testbed.rabbitmq import NEWEST, BrokerRelease, RabbitMQ

# The paths the StatefulSet mounts, as the script names them.
POD_TEMPLATE_DIR = "/etc/jobtide/rabbitmq-template"
POD_CREDENTIALS_DIR = "/etc/jobtide/rabbitmq-credentials"
POD_CONFIG_DIR = "/etc/jobtide/rabbitmq"


def run_render_config(docs: list[dict[str, Any]], credentials: dict[str, str], root: Path) -> Path:
    """Lay out the ConfigMap and the credentials as the pod sees them (under `root`), run
    render-config.sh with `sh`, and return the directory it wrote."""
    files: dict[str, str] = find(docs, "ConfigMap", "-rabbitmq")["data"]
    template, secret, out, home = (root / d for d in ("template", "credentials", "out", "home"))
    for directory in (template, secret, out, home):
        directory.mkdir(parents=True)
    for name, text in files.items():
        (template / name).write_text(text)
    for key, value in credentials.items():
        (secret / key).write_text(value)
    script = files["render-config.sh"]
    for pod_path, local in (
        (POD_TEMPLATE_DIR, template),
        (POD_CREDENTIALS_DIR, secret),
        (POD_CONFIG_DIR, out),
    ):
        script = script.replace(f"={pod_path}\n", f"={local}\n")
    subprocess.run(
        ["sh", "-c", script],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    return out


def secret_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    secret = find(docs, "Secret", "-rabbitmq")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


class ChartBroker(RabbitMQ):
    """A test-bed RabbitMQ node configured by the chart's files instead of its own: only the
    listeners move to free loopback ports and the definitions path to the local copy."""

    def __init__(
        self,
        root: Path,
        rendered: Path,
        credentials: dict[str, str],
        release: BrokerRelease = NEWEST,
    ) -> None:
        self.rendered = rendered
        self.prometheus_port = free_port()
        super().__init__(root, name="chart", release=release)
        self.username = credentials["username"]
        self.password = credentials["password"]

    def _write_config(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        conf = (self.rendered / "rabbitmq.conf").read_text()
        # The broker sees only its own folder: the definitions go there.
        definitions = self.root / "definitions.json"
        shutil.copy2(self.rendered / "definitions.json", definitions)
        replacements = {
            "listeners.tcp.default": f"{self.host}:{self.amqp_port}",
            "management.tcp.port": str(self.management_port),
            "definitions.local.path": self.inside(definitions),
        }
        for key, value in replacements.items():
            conf, count = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", conf, flags=re.M)
            assert count == 1, f"{key} not set exactly once in the chart's rabbitmq.conf"
        conf += "management.tcp.ip = 127.0.0.1\n"
        conf += f"prometheus.tcp.port = {self.prometheus_port}\n"
        conf += "prometheus.tcp.ip = 127.0.0.1\n"
        (self.root / "rabbitmq.conf").write_text(conf)
        (self.root / "enabled_plugins").write_text((self.rendered / "enabled_plugins").read_text())
