"""HTTP(S) sessions to the broker's management API, and what its answers mean, for the
scaler and the worker alike.

`management_session` authenticates with the broker's credentials and, with TLS, verifies the
broker's certificate exactly as AMQP does (`BrokerConfig.ssl_context`: its CA bundle alone,
or the system's, and the name its certificate must carry); nothing falls back to plain HTTP.
`published_count` reads a queue's publish counter (the scaler dates the oldest waiting message
by it, an idle worker tells a silent queue by it).
"""

from __future__ import annotations

from typing import Any

import requests
import requests.adapters
import requests.auth

from jobtide_worker.config import BrokerConfig

__all__ = ["OddAnswer", "count", "management_session", "published_count"]


class _BrokerTlsAdapter(requests.adapters.HTTPAdapter):
    """HTTPS verified with the broker's SSL context and for the broker's TLS name."""

    def __init__(self, broker: BrokerConfig) -> None:
        self._context = broker.ssl_context()
        self._server_name = broker.tls_name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        kwargs["server_hostname"] = self._server_name
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # The context holds the trust: requests would load its own CA bundle into it.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class _BrokerAuth(requests.auth.AuthBase):
    """Basic auth with the broker's credentials as they are at each request: those given as
    files are read again (`BrokerConfig.credentials`), so a rotated Secret applies at once."""

    def __init__(self, broker: BrokerConfig) -> None:
        self._broker = broker

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        basic: requests.PreparedRequest = requests.auth.HTTPBasicAuth(*self._broker.credentials())(
            request
        )
        return basic


def management_session(broker: BrokerConfig) -> requests.Session:
    """A session for `broker.management_url`, with the broker's credentials and TLS; each
    request on a new connection."""
    session = requests.Session()
    session.auth = _BrokerAuth(broker)
    # The management API closes a keep-alive connection after 5 s without a request (its HTTP
    # server's request timeout), which is both the scaler's and an idle worker's period: a
    # reused connection was sometimes cut just as it was used (about one read in ten).
    session.headers["Connection"] = "close"
    if broker.tls:
        session.mount("https://", _BrokerTlsAdapter(broker))
    return session


class OddAnswer(ValueError):
    """The management API answered, but not with what was asked; the message names what is
    missing or wrong."""


def count(field: str, value: Any) -> int:
    """`value` when it is a count (an int, not negative), else OddAnswer naming `field`."""
    if type(value) is not int or value < 0:
        raise OddAnswer(f"{field} is {value!r}, not a count")
    return value


def published_count(message_stats: Any) -> int | None:
    """The messages published to a queue since the broker's statistics began (its last start),
    from the queue's `message_stats` as `columns=message_stats.publish` answers it.

    None when there is no publish counter: no `message_stats` (a broker that keeps no message
    statistics, or a queue nothing has happened to since they began) or none in it. `[]` is
    the empty set, as RabbitMQ encodes one: statistics are kept and nothing was published since
    they began (a restarted broker, until something is published again), so 0. OddAnswer for
    anything else that is not a count."""
    if message_stats is None:
        return None
    if isinstance(message_stats, list) and not message_stats:
        return 0
    if not isinstance(message_stats, dict):
        raise OddAnswer(f"message_stats.publish is not a count ({message_stats!r:.80})")
    published = message_stats.get("publish")
    return None if published is None else count("message_stats.publish", published)
