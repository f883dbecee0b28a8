"""The worker's configuration: environment variables, validated once at start into one frozen
object. The variables are documented in images/worker/README.md (one table)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from jobtide_worker import priority

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad or missing variable; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 5672
    vhost: str = "/"
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    tls: bool = False
    heartbeat_seconds: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerConfig:
        e = _Env(os.environ if env is None else env)
        return cls(
            host=e.required("JOBTIDE_BROKER_HOST"),
            port=e.number("JOBTIDE_BROKER_PORT", 5672, int, minimum=1, maximum=65535),
            vhost=e.text("JOBTIDE_BROKER_VHOST", "/"),
            username=e.secret("JOBTIDE_BROKER_USERNAME"),
            password=e.secret("JOBTIDE_BROKER_PASSWORD"),
            tls=e.boolean("JOBTIDE_BROKER_TLS", False),
            heartbeat_seconds=e.number("JOBTIDE_HEARTBEAT_SECONDS", 30, int, minimum=1),
        )


@dataclass(frozen=True)
class WorkerConfig:
    broker: BrokerConfig
    queue: str
    pipeline: str
    handler: str = "handler:handle"
    idle_timeout_seconds: float = 5.0
    max_attempts: int = 3
    max_task_seconds: float = 3600.0
    prefetch: int = 1
    max_tasks: int = 0  # 0: no limit
    max_lifetime_seconds: float = 0.0  # 0: no limit
    shutdown_grace_seconds: float = 25.0
    reconnect_seconds: float = 60.0
    log_format: str = "text"
    declare_topology: bool = True
    worker_name: str = field(default_factory=socket.gethostname)
    consumer_priority: str = priority.AGE  # jobtide_worker.priority: age or none

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        source = os.environ if env is None else env
        e = _Env(source)
        queue = e.required("JOBTIDE_QUEUE")
        return cls(
            broker=BrokerConfig.from_env(source),
            queue=queue,
            pipeline=e.text("JOBTIDE_PIPELINE", queue),
            handler=e.handler("JOBTIDE_HANDLER", "handler:handle"),
            idle_timeout_seconds=e.number("JOBTIDE_IDLE_TIMEOUT_SECONDS", 5.0, float, minimum=0),
            max_attempts=e.number("JOBTIDE_MAX_ATTEMPTS", 3, int, minimum=1),
            max_task_seconds=e.number("JOBTIDE_MAX_TASK_SECONDS", 3600.0, float, minimum=1),
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
            consumer_priority=e.choice("JOBTIDE_CONSUMER_PRIORITY", priority.AGE, priority.MODES),
        )

    def summary(self) -> dict[str, object]:
        """Everything worth logging at start; the credentials are left out."""
        return {
            "queue": self.queue,
            "pipeline": self.pipeline,
            "handler": self.handler,
            "broker": f"{self.broker.host}:{self.broker.port}",
            "vhost": self.broker.vhost,
            "tls": self.broker.tls,
            "prefetch": self.prefetch,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "max_attempts": self.max_attempts,
            "max_task_seconds": self.max_task_seconds,
            "max_tasks": self.max_tasks,
            "max_lifetime_seconds": self.max_lifetime_seconds,
            "shutdown_grace_seconds": self.shutdown_grace_seconds,
            "reconnect_seconds": self.reconnect_seconds,
            "worker": self.worker_name,
            "consumer_priority": self.consumer_priority,
        }


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.env.get(name, "").strip()
        if not value:
            raise ConfigError(name, "is required")
        return value

    def secret(self, name: str) -> str:
        """From `name` or the file named by `name_FILE`; never echoed in errors."""
        file_name = self.env.get(f"{name}_FILE", "").strip()
        if file_name:
            try:
                value = Path(file_name).read_text().strip()
            except OSError as e:
                raise ConfigError(
                    f"{name}_FILE", f"cannot read {file_name}: {e.strerror}"
                ) from None
            if not value:
                raise ConfigError(f"{name}_FILE", f"{file_name} is empty")
            return value
        value = self.env.get(name, "")
        if not value:
            raise ConfigError(name, f"is required (or {name}_FILE)")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise ConfigError(name, f"expected true or false, got {raw!r}")

    def number(
        self,
        name: str,
        default: T,
        kind: Callable[[str], T],
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(name, f"expected {kind.__name__}, got {raw!r}") from None
        number = float(value)  # type: ignore[arg-type]
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(name, f"expected a finite number, got {raw!r}")
        if minimum is not None and number < minimum:
            raise ConfigError(name, f"must be >= {minimum:g}, got {raw!r}")
        if maximum is not None and number > maximum:
            raise ConfigError(name, f"must be <= {maximum:g}, got {raw!r}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            raise ConfigError(name, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def handler(self, name: str, default: str) -> str:
        value = self.text(name, default)
        module, sep, function = value.partition(":")
        if not sep or not module or not function.isidentifier():
            raise ConfigError(name, f"expected module:function, got {value!r}")
        return value
