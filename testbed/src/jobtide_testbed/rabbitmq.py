"""An isolated RabbitMQ node (a Debian release's rabbitmq-server) with the management API.

The broker and its Erlang live in a Debian root of the release that packages them, built once
by `ci/setup broker` (ci/lib/broker_root.sh, pinned in ci/versions): the machine's own Debian
has only an unsupported 3.10. Every command of the node runs chrooted into that root, in a
mount namespace of its own that binds /proc and the node's folder (`root`, seen inside as
/srv/node), so nothing stays mounted once the node's processes are gone, and the root itself
is shared read-only by every node.

Everything is private to the node: ports picked free on 127.0.0.1, its own epmd on its own
port, its own HOME (Erlang cookie), data and log folders under `root`. Data survive
`stop()`/`start()`, so tests can restart the broker mid-stream.

With `tls` (`broker_tls`: a test CA and a server certificate made with openssl) the node also
listens for AMQPS and management HTTPS on ports of their own, with the plain listeners kept or
turned off as the test asks.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from jobtide_worker.config import Variable

from jobtide_testbed.pki import PKI
from jobtide_testbed.process import Process, free_port, port_open, run, wait_for
from jobtide_testbed.tools import CACHE, REPO, ensure_stage

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the unwrapped scripts: no `su rabbitmq`
# Where a node's own folder appears inside the release's root (made by broker_root.sh).
NODE_DIR = Path("/srv/node")


@dataclass(frozen=True)
class BrokerRelease:
    """A RabbitMQ version as a Debian release packages it (ci/versions)."""

    suite: str
    version: str
    stage: str  # the ci/setup stage that builds its root

    @property
    def root(self) -> Path:
        """The Debian root holding this release's RabbitMQ and Erlang."""
        return CACHE / f"rabbitmq-{self.suite}-{self.version}" / "root"

    @property
    def label(self) -> str:
        return f"{self.version} (Debian {self.suite})"


def _pinned() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "ci" / "versions").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            pins[key.strip()] = value.strip()
    return pins


# Every integration and e2e test runs on NEWEST; the compatibility set also on FLOOR, the
# oldest version the chart supports.
NEWEST = BrokerRelease(_pinned()["RABBITMQ_SUITE"], _pinned()["RABBITMQ_VERSION"], stage="broker")
FLOOR = BrokerRelease(
    _pinned()["RABBITMQ_FLOOR_SUITE"], _pinned()["RABBITMQ_FLOOR_VERSION"], stage="broker-floor"
)


def in_release(release: BrokerRelease, node_dir: Path, argv: list[str]) -> list[str]:
    """`argv` run chrooted into `release`'s root with /proc and `node_dir` (as NODE_DIR)
    mounted in a private mount namespace: the mounts end with the last process in it.
    No fork: the command keeps the pid (and process group) it was started with."""
    script = (
        'mount -t proc proc "$0/proc" && mount --bind "$1" "$0$2" && shift 2 '
        '&& exec chroot "$0" "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
        str(release.root), str(node_dir), str(NODE_DIR), *argv,
    ]  # fmt: skip


# The name a TLS node's certificate is made for: it resolves to the node's 127.0.0.1 here
# (/etc/hosts), so a client can connect by it and check it; 127.0.0.1 is left out of the
# certificate, so a client connecting by address meets a certificate for another name.
TLS_HOST = "localhost"


@dataclass(frozen=True)
class BrokerTls:
    """A node's TLS material: the CA that clients trust and the server's key pair."""

    ca: Path
    cert: Path
    key: Path
    # The plain AMQP and HTTP listeners too; off, the node speaks TLS only.
    plain: bool = False


def broker_tls(
    pki_dir: Path, *, plain: bool = False, names: tuple[str, ...] = (TLS_HOST,)
) -> BrokerTls:
    """A test CA under `pki_dir` (made once) and a server certificate for `names` signed by it."""
    pki = PKI(pki_dir)
    pair = pki.issue("rabbitmq", common_name=names[0], dns=names, server=True)
    return BrokerTls(ca=pki.ca.cert, cert=pair.cert, key=pair.key, plain=plain)


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    unacked: int
    consumers: int


class RabbitMQ:
    def __init__(
        self,
        root: Path,
        *,
        name: str = "rabbit",
        consumer_timeout_ms: int | None = None,
        stats_interval_ms: int = 1000,
        release: BrokerRelease = NEWEST,
        tls: BrokerTls | None = None,
    ) -> None:
        ensure_stage(release.stage)
        self.release = release
        self.root = root
        self.nodename = f"jt-{name}-{secrets.token_hex(3)}@localhost"
        self.host = "127.0.0.1"
        self.amqp_port = free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.tls = tls
        # The TLS listeners' ports; None without `tls`.
        self.amqps_port = free_port() if tls else None
        self.management_tls_port = free_port() if tls else None
        self.username = "jobtide"
        self.password = secrets.token_urlsafe(16)
        self.vhost = "/"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.stats_interval_ms = stats_interval_ms
        root.mkdir(parents=True, exist_ok=True)
        self._epmd = Process(
            f"{name}-epmd",
            self._in_root(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"]),
            root / "logs",
        )
        self._server = Process(
            name, self._in_root([str(RABBITMQ_BIN / "rabbitmq-server")]), root / "logs",
            env=self._env(),
        )  # fmt: skip
        self._write_config()

    # -- addresses ----------------------------------------------------------------------
    @property
    def amqp_url(self) -> str:
        vhost = urllib.parse.quote(self.vhost, safe="")
        return f"amqp://{self.username}:{self.password}@{self.host}:{self.amqp_port}/{vhost}"

    @property
    def plain(self) -> bool:
        """Whether the plain AMQP and HTTP listeners are on."""
        return self.tls is None or self.tls.plain

    @property
    def management_url(self) -> str:
        """The management API over plain HTTP, or HTTPS (by TLS_HOST) on a TLS-only node."""
        if self.plain:
            return f"http://{self.host}:{self.management_port}"
        return f"https://{TLS_HOST}:{self.management_tls_port}"

    @property
    def processes(self) -> list[Process]:
        return [self._epmd, self._server]

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 90) -> RabbitMQ:
        if not self._epmd.running():
            self._epmd.start()
            wait_for(lambda: port_open(self.epmd_port), timeout=10, what="epmd")
        self._server.start()

        def ready() -> bool:
            self._server.check_alive()
            return (
                self.ctl("await_startup", "--timeout", "5", check=False).returncode == 0
                and all(port_open(port) for port in self._amqp_ports())
                and self._management_up()
            )

        wait_for(ready, timeout=timeout, what=f"RabbitMQ {self.nodename}", interval=0.5)
        return self

    def stop(self) -> None:
        """Stop the node cleanly (SIGTERM makes RabbitMQ shut down in order; data kept).
        The node's epmd keeps running for the next start."""
        self._server.stop(timeout=60)

    def kill(self) -> None:
        """Kill the node at once, like a crashed pod (data kept)."""
        self._server.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop everything, epmd included."""
        self.stop()
        self._epmd.stop()

    def running(self) -> bool:
        return self._server.running()

    # -- administration -----------------------------------------------------------------
    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        return run(
            self._in_root([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *args]),
            env=self._env(),
            timeout=timeout,
            check=check,
        )

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A call to the management API as the admin user."""
        return requests.request(
            method,
            f"{self.management_url}/api/{path.lstrip('/')}",
            auth=(self.username, self.password),
            timeout=10,
            verify=str(self.tls.ca) if self.tls else True,
            **kwargs,
        )

    def tls_client_env(self) -> dict[str, str]:
        """The `JOBTIDE_BROKER_*` variables of a client that reaches this node over TLS only
        (AMQPS and management HTTPS, by TLS_HOST), trusting the test CA alone."""
        if self.tls is None:
            raise ValueError(f"{self.nodename} was started without tls")
        return {
            Variable.BROKER_HOST: TLS_HOST,
            Variable.BROKER_PORT: str(self.amqps_port),
            Variable.BROKER_MANAGEMENT_PORT: str(self.management_tls_port),
            Variable.BROKER_VHOST: self.vhost,
            Variable.BROKER_USERNAME: self.username,
            Variable.BROKER_PASSWORD: self.password,
            Variable.BROKER_TLS: "true",
            Variable.BROKER_CA_FILE: str(self.tls.ca),
        }

    def connections(self) -> list[dict[str, Any]]:
        """The node's client connections as the management API lists them (`ssl`,
        `client_properties.connection_name`, ...)."""
        response = self.api("GET", "connections")
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()
        return found

    def set_user(self, name: str, password: str) -> None:
        """Create user `name` with every right on the node's vhost and the `management` tag
        (jobtide reads queue counters from the management API), or change its password: the
        old one is refused from then on (connections already open stay)."""
        user = urllib.parse.quote(name, safe="")
        self.api("PUT", f"users/{user}", json={"password": password, "tags": "management"})\
            .raise_for_status()  # fmt: skip
        vhost = urllib.parse.quote(self.vhost, safe="")
        rights = {"configure": ".*", "write": ".*", "read": ".*"}
        self.api("PUT", f"permissions/{vhost}/{user}", json=rights).raise_for_status()

    def delete_user(self, name: str) -> None:
        self.api("DELETE", f"users/{urllib.parse.quote(name, safe='')}")

    def close_connection(self, name: str) -> None:
        """Close client connection `name` (as `connections()` names it) from the broker's side."""
        response = self.api("DELETE", f"connections/{urllib.parse.quote(name, safe='')}")
        if response.status_code != 204:
            raise RuntimeError(f"closing connection {name!r}: HTTP {response.status_code}")

    def queue_counts(self, queue: str) -> QueueCounts:
        vhost = urllib.parse.quote(self.vhost, safe="")
        r = self.api("GET", f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}")
        r.raise_for_status()
        q = r.json()
        return QueueCounts(
            ready=int(q.get("messages_ready", 0)),
            unacked=int(q.get("messages_unacknowledged", 0)),
            consumers=int(q.get("consumers", 0)),
        )

    def delete_queue(self, queue: str) -> None:
        vhost = urllib.parse.quote(self.vhost, safe="")
        self.api("DELETE", f"queues/{vhost}/{urllib.parse.quote(queue, safe='')}")

    def inside(self, path: Path) -> str:
        """`path`, a file under the node's folder, as the broker sees it."""
        return str(NODE_DIR / path.relative_to(self.root))

    # -- internals ----------------------------------------------------------------------
    def _amqp_ports(self) -> list[int]:
        ports = [self.amqp_port] if self.plain else []
        return ports + ([self.amqps_port] if self.amqps_port is not None else [])

    def _in_root(self, argv: list[str]) -> list[str]:
        return in_release(self.release, self.root, argv)

    def _management_up(self) -> bool:
        try:
            return self.api("GET", "overview").status_code == 200
        except requests.RequestException:
            return False

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL"))}
        node = NODE_DIR
        env.update(
            PATH="/usr/sbin:/usr/bin:/sbin:/bin",
            HOME=str(node / "home"),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(node / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(node / "mnesia"),
            RABBITMQ_LOG_BASE=str(node / "log"),
            RABBITMQ_LOGS="-",
            RABBITMQ_PID_FILE=str(node / "rabbit.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_config(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        lines = []
        if self.plain:
            lines += [
                # A bare port would listen on every interface.
                f"listeners.tcp.default = {self.host}:{self.amqp_port}",
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {self.management_port}",
            ]
        else:
            lines.append("listeners.tcp = none")
        if self.tls is not None:
            lines += self._tls_config(self.tls)
        lines += [
            f"collect_statistics_interval = {self.stats_interval_ms}",
            f"default_user = {self.username}",
            f"default_pass = {self.password}",
            "default_user_tags.administrator = true",
            "loopback_users = none",
        ]
        if self.consumer_timeout_ms is not None:
            lines.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        (self.root / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.root / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def _tls_config(self, tls: BrokerTls) -> list[str]:
        """AMQPS and management HTTPS listeners with the server's certificate, copied into
        the node's folder for the broker to read. Clients are not asked for a certificate:
        they log in with user name and password, as jobtide's do."""
        folder = self.root / "tls"
        folder.mkdir(exist_ok=True)
        files = {}
        for name, source in (("cacertfile", tls.ca), ("certfile", tls.cert), ("keyfile", tls.key)):
            copy = folder / source.name
            copy.write_bytes(source.read_bytes())
            files[name] = self.inside(copy)
        lines = [
            f"listeners.ssl.default = {self.host}:{self.amqps_port}",
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false",
            "management.ssl.ip = 127.0.0.1",
            f"management.ssl.port = {self.management_tls_port}",
        ]
        for name, path in files.items():
            lines += [f"ssl_options.{name} = {path}", f"management.ssl.{name} = {path}"]
        return lines


def wait_counts(
    broker: RabbitMQ, queue: str, *, timeout: float = 30, **expected: int
) -> QueueCounts:
    """Poll the management API until the queue's counts match `expected` (its statistics
    lag the broker by up to the stats interval)."""
    seen: list[QueueCounts] = []

    def matches() -> bool:
        c = broker.queue_counts(queue)
        seen.append(c)
        return all(getattr(c, k) == v for k, v in expected.items())

    try:
        wait_for(matches, timeout=timeout, what=f"queue {queue} counts {expected}")
    except TimeoutError as e:
        raise AssertionError(f"{e}; last seen {seen[-1:] or 'nothing'}") from None
    return seen[-1]
