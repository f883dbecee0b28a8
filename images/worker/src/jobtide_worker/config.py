"""The worker's configuration: environment variables, validated once at start into one frozen
object. The variables are documented in images/worker/README.md (one table).

`BrokerConfig.from_env` is the one parser of the `JOBTIDE_BROKER_*` variables,
`BrokerConfig.connection_parameters` the one builder of pika's connection parameters and
`BrokerConfig.connect` the one way to open a connection: the worker, the publisher and the
scaler all use them. The names of the variables that other parts set (`Variable`) are written
once, here: the chart names them through templates generated from `Variable`
(charts/jobtide/templates/_env-names.tpl) and the scaler imports them.

TLS (`JOBTIDE_BROKER_TLS`) always verifies the broker's certificate, against the CA bundle of
`JOBTIDE_BROKER_CA_FILE` (or the system's) and for the host name connected to (or
`JOBTIDE_BROKER_SERVER_NAME`); nothing ever falls back to plain text. A TLS failure that no
retry can mend (a certificate that does not verify, a port that does not speak TLS) is raised
as `BrokerTlsError`, whose message names the problem; `tls_problem` tells one apart from a
passing network error for any client (pika, requests)."""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import pika  # type: ignore[import-untyped]

from jobtide_worker import priority
from jobtide_worker.pipeline_settings import PipelineSettings, setting_specs

T = TypeVar("T")


class Variable:
    """The names of the environment variables that another part sets for the worker (and the
    scaler), each written once: the chart sets the broker's and the handler's, naming each by
    the template `jobtide.env.<ATTRIBUTE>` that `python -m jobtide_scaler.contracts --write`
    generates from this class (charts/jobtide/templates/_env-names.tpl); the scaler reads the
    broker's with `BrokerConfig.from_env` and sets the pipeline's and the queue's on every
    worker Job (with those of `PIPELINE_VARIABLES`)."""

    BROKER_HOST: Final = "JOBTIDE_BROKER_HOST"
    BROKER_PORT: Final = "JOBTIDE_BROKER_PORT"
    BROKER_VHOST: Final = "JOBTIDE_BROKER_VHOST"
    BROKER_USERNAME: Final = "JOBTIDE_BROKER_USERNAME"
    BROKER_PASSWORD: Final = "JOBTIDE_BROKER_PASSWORD"  # noqa: S105 (a name, no password)
    BROKER_USERNAME_FILE: Final = "JOBTIDE_BROKER_USERNAME_FILE"
    BROKER_PASSWORD_FILE: Final = "JOBTIDE_BROKER_PASSWORD_FILE"  # noqa: S105
    BROKER_TLS: Final = "JOBTIDE_BROKER_TLS"
    BROKER_CA_FILE: Final = "JOBTIDE_BROKER_CA_FILE"
    BROKER_SERVER_NAME: Final = "JOBTIDE_BROKER_SERVER_NAME"
    HEARTBEAT_SECONDS: Final = "JOBTIDE_HEARTBEAT_SECONDS"
    BROKER_MANAGEMENT_PORT: Final = "JOBTIDE_BROKER_MANAGEMENT_PORT"
    QUORUM_INITIAL_GROUP_SIZE: Final = "JOBTIDE_QUORUM_INITIAL_GROUP_SIZE"
    HANDLER: Final = "JOBTIDE_HANDLER"
    PIPELINE: Final = "JOBTIDE_PIPELINE"
    QUEUE: Final = "JOBTIDE_QUEUE"


# What a worker started without the scaler's variables does: the pipeline settings' defaults.
_PIPELINE_DEFAULTS = PipelineSettings()
_PIPELINE_SPECS = setting_specs(PipelineSettings)
# The pipeline settings a worker takes from its environment, by field: the scaler sets these
# variables on every worker Job from the pipeline's settings (jobtide_scaler.jobs.worker_env).
PIPELINE_VARIABLES = {
    "idle_timeout_seconds": "JOBTIDE_IDLE_TIMEOUT_SECONDS",
    "quiet_check_seconds": "JOBTIDE_QUIET_CHECK_SECONDS",
    "max_attempts": "JOBTIDE_MAX_ATTEMPTS",
    "max_task_seconds": "JOBTIDE_MAX_TASK_SECONDS",
}
# A broker host: a DNS name or an IPv4 address, never a URL (`amqp://host:5672`) or host:port.
# The chart's schema takes its externalBroker.host pattern from here.
HOST_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class BrokerTlsError(Exception):
    """TLS to the broker failed for a reason that retrying cannot mend: a configuration
    problem, named by the message. Not an OSError, so reconnect loops do not retry it."""


class ConfigError(ValueError):
    """Bad or missing variables; each of `problems` starts with the variable it is about,
    `variable` is the first of them."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = [f"{variable}: {problem}" for variable, problem in problems]
        super().__init__("; ".join(self.problems))
        self.variable = problems[0][0]


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    # Where `username` and `password` were read from (`*_FILE`), None when given as values:
    # `credentials()` reads these files again at every connection.
    username_file: str | None = None
    password_file: str | None = None
    tls: bool = False
    # PEM CA bundle the broker's certificate must chain to; None: the system's CA bundle.
    ca_file: str | None = None
    # The name the broker's certificate must be valid for; None: `host`.
    server_name: str | None = None
    heartbeat_seconds: int = 30
    management_port: int = 15672  # the scaler reads queue counts from the management API
    # Members of each quorum queue declared (`x-quorum-initial-group-size`): the broker
    # cluster's size, so the worker declares its queues exactly as the chart's definitions do;
    # 0 leaves the argument out (the broker's default).
    quorum_group_size: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerConfig:
        """The broker from `JOBTIDE_BROKER_*` (and `JOBTIDE_HEARTBEAT_SECONDS`,
        `JOBTIDE_QUORUM_INITIAL_GROUP_SIZE`), named by `Variable`; raises
        ConfigError naming every bad variable."""
        e = _Env(os.environ if env is None else env)
        broker = cls._read(e)
        e.raise_problems()
        return broker

    @classmethod
    def _read(cls, e: _Env) -> BrokerConfig:
        # In the variables' order, so that their problems are reported in it.
        v = Variable
        return cls(
            host=e.host(v.BROKER_HOST),
            port=e.port(v.BROKER_PORT, 5672),
            vhost=e.text(v.BROKER_VHOST, "/"),
            username=e.secret(v.BROKER_USERNAME, v.BROKER_USERNAME_FILE),
            password=e.secret(v.BROKER_PASSWORD, v.BROKER_PASSWORD_FILE),
            username_file=e.text(v.BROKER_USERNAME_FILE, "") or None,
            password_file=e.text(v.BROKER_PASSWORD_FILE, "") or None,
            tls=(tls := e.boolean(v.BROKER_TLS, False)),
            ca_file=e.ca_file(v.BROKER_CA_FILE, tls=tls),
            server_name=e.server_name(v.BROKER_SERVER_NAME, tls=tls),
            heartbeat_seconds=e.number(v.HEARTBEAT_SECONDS, 30, int, minimum=1),
            management_port=e.port(v.BROKER_MANAGEMENT_PORT, 15672),
            quorum_group_size=e.number(v.QUORUM_INITIAL_GROUP_SIZE, 0, int, minimum=0),
        )

    def credentials(self) -> tuple[str, str]:
        """The user name and password to connect with now. Those given as files are read
        again: kubelet updates a mounted Secret's files in place, so a rotated password
        reaches the next connection without a restart. A file unreadable at that moment
        gives the value read at start (checked then: `from_env` fails on an unreadable one)."""
        username = _reread(self.username_file, self.username)
        password = _reread(self.password_file, self.password)
        return username, password

    @property
    def management_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.management_port}"

    @property
    def tls_name(self) -> str:
        """The name the broker's certificate is checked against."""
        return self.server_name or self.host

    def ssl_context(self) -> ssl.SSLContext:
        """Certificate and host name verification always on (CERT_REQUIRED, check_hostname),
        trusting `ca_file` alone when given, else the system's CA bundle."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def connect(self, connection_name: str, **parameters: Any) -> pika.BlockingConnection:
        """A pika.BlockingConnection (keyword arguments as for `connection_parameters`);
        raises BrokerTlsError naming a TLS problem no retry can mend, and pika's or the
        socket's own errors otherwise."""
        try:
            return pika.BlockingConnection(
                self.connection_parameters(connection_name, **parameters)
            )
        except Exception as e:
            problem = self.tls_problem(e)
            if problem is not None:
                raise BrokerTlsError(problem) from e
            raise

    def tls_problem(self, error: BaseException, *, port: int | None = None) -> str | None:
        """What `error` (from pika, requests or the ssl module, however wrapped) says about
        TLS to the broker's `port` (the AMQP port by default), as a message naming the
        problem; None when it is not a lasting TLS failure (a refused or cut connection,
        a timeout: worth retrying)."""
        if not self.tls:
            return None
        port = self.port if port is None else port
        where = f"{self.host}:{port}"
        for cause in _causes(error):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return self._verification_problem(cause, where)
            # `reason` is OpenSSL's; errors the ssl module makes itself have none.
            reason = getattr(cause, "reason", None)
            if isinstance(cause, ssl.SSLError) and reason in _NOT_TLS_REASONS:
                return (
                    f"{where} does not speak TLS (it answered with something else, likely "
                    f"plain AMQP or HTTP): point the port at the broker's TLS listener "
                    f"(AMQPS is usually 5671, management HTTPS 15671) ({reason})"
                )
        return None

    def _verification_problem(self, error: ssl.SSLCertVerificationError, where: str) -> str:
        code, detail = error.verify_code, error.verify_message
        if code in _WRONG_NAME_CODES:
            return (
                f"the certificate of {where} is not valid for the name {self.tls_name!r} "
                f"(connect by a name it was issued for, or set {Variable.BROKER_SERVER_NAME} "
                f"to one) ({detail})"
            )
        if code in _UNTRUSTED_CODES:
            trusted = f"the CA bundle {self.ca_file}" if self.ca_file else "the system's CA bundle"
            return (
                f"the certificate of {where} is not signed by a CA in {trusted} "
                f"({Variable.BROKER_CA_FILE} must hold the CA that signed it) ({detail})"
            )
        return f"the certificate of {where} failed verification ({detail})"

    def connection_parameters(
        self,
        connection_name: str,
        *,
        heartbeat_seconds: int | None = None,
        socket_timeout: float = 10,
        blocked_connection_timeout: float = 300,
    ) -> pika.ConnectionParameters:
        """pika's parameters for one connection attempt (callers retry as they see fit);
        `heartbeat_seconds` 0 turns heartbeats off, None uses the configured value."""
        ssl_options = None
        if self.tls:
            ssl_options = pika.SSLOptions(self.ssl_context(), self.tls_name)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(*self.credentials()),
            heartbeat=self.heartbeat_seconds if heartbeat_seconds is None else heartbeat_seconds,
            blocked_connection_timeout=blocked_connection_timeout,
            ssl_options=ssl_options,
            connection_attempts=1,
            socket_timeout=socket_timeout,
            client_properties={"connection_name": connection_name},
        )


@dataclass(frozen=True)
class WorkerConfig:
    broker: BrokerConfig
    queue: str
    pipeline: str
    handler: str = "handler:handle"
    idle_timeout_seconds: float = _PIPELINE_DEFAULTS.idle_timeout_seconds
    # While idle, read the queue's counters this often and leave once it is silent; 0: never.
    quiet_check_seconds: float = _PIPELINE_DEFAULTS.quiet_check_seconds
    max_attempts: int = _PIPELINE_DEFAULTS.max_attempts
    max_task_seconds: float = _PIPELINE_DEFAULTS.max_task_seconds
    prefetch: int = 1
    max_tasks: int = 0  # 0: no limit
    max_lifetime_seconds: float = 0.0  # 0: no limit
    shutdown_grace_seconds: float = 25.0
    reconnect_seconds: float = 60.0
    log_format: str = "text"
    declare_topology: bool = True
    worker_name: str = field(default_factory=socket.gethostname)
    consumer_priority: str = priority.DEFAULT  # jobtide_worker.priority.MODES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        source = os.environ if env is None else env
        e = _Env(source)
        queue = e.required(Variable.QUEUE)
        config = cls(
            broker=BrokerConfig._read(e),
            queue=queue,
            pipeline=e.text(Variable.PIPELINE, queue),
            handler=e.handler(Variable.HANDLER, "handler:handle"),
            **{
                field_name: e.setting(variable, field_name)
                for field_name, variable in PIPELINE_VARIABLES.items()
            },
            prefetch=e.number("JOBTIDE_PREFETCH", 1, int, minimum=1, maximum=65535),
            max_tasks=e.number("JOBTIDE_MAX_TASKS", 0, int, minimum=0),
            max_lifetime_seconds=e.number("JOBTIDE_MAX_LIFETIME_SECONDS", 0.0, float, minimum=0),
            shutdown_grace_seconds=e.number(
                "JOBTIDE_SHUTDOWN_GRACE_SECONDS", 25.0, float, minimum=0
            ),
            reconnect_seconds=e.number("JOBTIDE_RECONNECT_SECONDS", 60.0, float, minimum=0),
            log_format=e.choice("JOBTIDE_LOG_FORMAT", "text", ("text", "json")),
            declare_topology=e.boolean("JOBTIDE_DECLARE_TOPOLOGY", True),
            worker_name=e.text("JOBTIDE_WORKER_NAME", "")
            or source.get("HOSTNAME", "")
            or socket.gethostname(),
            consumer_priority=e.choice(
                "JOBTIDE_CONSUMER_PRIORITY", priority.DEFAULT, priority.MODES
            ),
        )
        e.raise_problems()
        return config

    def summary(self) -> dict[str, object]:
        """Everything worth logging at start; the credentials are left out."""
        return {
            "queue": self.queue,
            "pipeline": self.pipeline,
            "handler": self.handler,
            "broker": f"{self.broker.host}:{self.broker.port}",
            "vhost": self.broker.vhost,
            "tls": self.broker.tls,
            "tls_ca_file": self.broker.ca_file,
            "tls_server_name": self.broker.tls_name if self.broker.tls else None,
            "prefetch": self.prefetch,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "quiet_check_seconds": self.quiet_check_seconds,
            "management": self.broker.management_url if self.quiet_check_seconds else None,
            "max_attempts": self.max_attempts,
            "max_task_seconds": self.max_task_seconds,
            "max_tasks": self.max_tasks,
            "max_lifetime_seconds": self.max_lifetime_seconds,
            "shutdown_grace_seconds": self.shutdown_grace_seconds,
            "reconnect_seconds": self.reconnect_seconds,
            "worker": self.worker_name,
            "consumer_priority": self.consumer_priority,
        }


# OpenSSL's verify codes (`X509_V_ERR_*`) of a certificate issued for another name or address.
_WRONG_NAME_CODES = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
# ... of a certificate chain that leads to no trusted CA.
_UNTRUSTED_CODES = {
    2,  # UNABLE_TO_GET_ISSUER_CERT
    18,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # SELF_SIGNED_CERT_IN_CHAIN
    20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
# OpenSSL's reasons when the peer's first bytes are not a TLS record: the port speaks another
# protocol (RabbitMQ's plain AMQP listener answers a ClientHello with its protocol header).
_NOT_TLS_REASONS = {
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
}


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps: pika hands over the ssl module's error; requests wraps
    urllib3's, which keeps the ssl module's as `reason`, args or cause."""
    seen: list[BaseException] = []
    pending = [error]
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        reason = getattr(current, "reason", None)
        linked = [current.__cause__, current.__context__, reason, *current.args]
        pending += [item for item in linked if isinstance(item, BaseException)]
    return seen


def _reread(path: str | None, at_start: str) -> str:
    """The file's text now; `at_start` when there is no file or it cannot be read or is empty."""
    if path is None:
        return at_start
    try:
        return Path(path).read_text().strip() or at_start
    except OSError:
        return at_start


# Accepted spellings of a boolean variable (any case), for every program reading them.
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Env:
    """Reads variables, noting each problem (a bad value reads as its default) so that all
    of them are reported together by `raise_problems`."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[tuple[str, str]] = []

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)

    def _problem(self, name: str, problem: str, default: T) -> T:
        self.problems.append((name, problem))
        return default

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.env.get(name, "").strip()
        return value or self._problem(name, "is required", "")

    def host(self, name: str) -> str:
        value = self.required(name)
        if value and not re.fullmatch(HOST_PATTERN, value):
            problem = "expected a host name or IPv4 address (no scheme, port or path)"
            return self._problem(name, f"{problem}, got {value!r}", value)
        return value

    def secret(self, name: str, file_variable: str) -> str:
        """From `name` or the file named by `file_variable`; never echoed in errors."""
        file_name = self.env.get(file_variable, "").strip()
        if file_name:
            try:
                value = Path(file_name).read_text().strip()
            except OSError as e:
                return self._problem(file_variable, f"cannot read {file_name}: {e.strerror}", "")
            return value or self._problem(file_variable, f"{file_name} is empty", "")
        problem = f"is required (or {file_variable})"
        return self.env.get(name, "") or self._problem(name, problem, "")

    def tls_only(self, name: str, *, tls: bool) -> str | None:
        """A variable that only means something with TLS on: None when unset, a problem when
        set with TLS off (the user expects TLS; nothing falls back to plain text)."""
        value = self.env.get(name, "").strip()
        if value and not tls:
            return self._problem(name, f"is set but {Variable.BROKER_TLS} is not true", None)
        return value or None

    def ca_file(self, name: str, *, tls: bool) -> str | None:
        """A readable PEM file of CA certificates."""
        path = self.tls_only(name, tls=tls)
        if path is None:
            return None
        try:
            ssl.create_default_context(cafile=path)
        except FileNotFoundError:
            return self._problem(name, f"{path} does not exist", None)
        except ssl.SSLError as e:
            return self._problem(name, f"{path} holds no PEM CA certificate ({e})", None)
        except OSError as e:
            return self._problem(name, f"cannot read {path}: {e.strerror}", None)
        return path

    def server_name(self, name: str, *, tls: bool) -> str | None:
        value = self.tls_only(name, tls=tls)
        if value is not None and not re.fullmatch(HOST_PATTERN, value):
            return self._problem(name, f"expected a host name, got {value!r}", None)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        return self._problem(name, f"expected true or false, got {raw!r}", default)

    def number(
        self,
        name: str,
        default: T,
        kind: Callable[[str], T],
        *,
        minimum: float | None = None,
        exclusive_minimum: float | None = None,
        maximum: float | None = None,
    ) -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            return self._problem(name, f"expected {kind.__name__}, got {raw!r}", default)
        number = float(value)  # type: ignore[arg-type]
        if number != number or number in (float("inf"), float("-inf")):
            return self._problem(name, f"expected a finite number, got {raw!r}", default)
        if minimum is not None and number < minimum:
            return self._problem(name, f"must be >= {minimum:g}, got {raw!r}", default)
        if exclusive_minimum is not None and number <= exclusive_minimum:
            return self._problem(name, f"must be > {exclusive_minimum:g}, got {raw!r}", default)
        if maximum is not None and number > maximum:
            return self._problem(name, f"must be <= {maximum:g}, got {raw!r}", default)
        return value

    def port(self, name: str, default: int) -> int:
        return self.number(name, default, int, minimum=1, maximum=65535)

    def setting(self, name: str, field_name: str) -> Any:
        """A pipeline setting passed by the scaler, with the setting's own kind, default and
        bounds (jobtide_worker.pipeline_settings)."""
        spec = _PIPELINE_SPECS[field_name]
        default = getattr(_PIPELINE_DEFAULTS, field_name)
        value = self.number(name, default, spec.kind)
        problem = spec.problem(value)
        if problem is not None:
            # The spec names its values key; the variable is named instead.
            return self._problem(name, problem.partition(": ")[2], default)
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            return self._problem(
                name, f"expected one of {', '.join(allowed)}, got {value!r}", default
            )
        return value

    def handler(self, name: str, default: str) -> str:
        value = self.text(name, default)
        module, sep, function = value.partition(":")
        if not sep or not module or not function.isidentifier():
            return self._problem(name, f"expected module:function, got {value!r}", default)
        return value
