"""HTTP(S) sessions to the broker's management API, for the scaler and the worker alike.

`management_session` authenticates with the broker's credentials and, with TLS, verifies the
broker's certificate exactly as AMQP does (`BrokerConfig.ssl_context`: its CA bundle alone,
or the system's, and the name its certificate must carry); nothing falls back to plain HTTP.
"""

from __future__ import annotations

from typing import Any

import requests
import requests.adapters
import requests.auth

from jobtide_worker.config import BrokerConfig

__all__ = ["management_session"]


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
    """A session for `broker.management_url`, with the broker's credentials and TLS."""
    session = requests.Session()
    session.auth = _BrokerAuth(broker)
    if broker.tls:
        session.mount("https://", _BrokerTlsAdapter(broker))
    return session
