"""An OCI registry on the test bed: the CNCF distribution registry (`ci/setup registry`), on a
free loopback port, serving TLS with a certificate of its own CA and asking for a password
(htpasswd, bcrypt). Charts go in with `helm push` and out with `helm install oci://...`;
images go in with `ctr images push` and the real node's containerd pulls them with a Secret,
as a cluster pulls from a private registry.

The node's containerd runs on the host, so a loopback address reaches the registry from it.
"""

from __future__ import annotations

import json
import secrets
import warnings
from pathlib import Path
from types import TracebackType

import requests
import yaml

from jobtide_testbed.pki import PKI
from jobtide_testbed.process import Process, free_port, wait_for
from jobtide_testbed.tools import helm, tool

# The one account the registry knows.
USERNAME = "jobtide"


def bcrypt_hash(password: str) -> str:
    """`password` hashed with bcrypt, the one scheme the registry's htpasswd reader accepts.
    Python 3.11 and 3.12 make it with the standard crypt module (gone in 3.13: the test bed
    runs on the repository's 3.11 venv)."""
    with warnings.catch_warnings():
        # Deprecated, not removed, in the Pythons the test bed runs on.
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    # bcrypt's lowest cost (2^4 rounds): the registry checks the password on every request,
    # and at the default cost each took 0.7 s here; what it guards is a throwaway password.
    # ruff lists bcrypt with crypt's weak methods; it is the one the registry reads.
    salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)  # noqa: S324
    hashed = crypt.crypt(password, salt)
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("this Python's crypt module cannot make bcrypt hashes")
    return hashed


class Registry:
    """One registry process with its own storage, certificate and password under `root`.
    `host` (address:port) is what image references, `helm push` and `docker login` name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(18)
        self.pki = PKI(root / "pki")
        self.tls = self.pki.issue(
            "registry", common_name="jobtide-testbed-registry", ips=("127.0.0.1",), server=True
        )
        self.ca = self.pki.ca.cert
        self.storage = root / "storage"
        self.process = Process(
            "registry",
            [tool("registry"), "serve", str(self._write_config())],
            root / "logs",
            # No OpenTelemetry exporter: the registry would keep trying to send its traces.
            env={"OTEL_TRACES_EXPORTER": "none", "PATH": "/usr/bin:/bin"},
        )

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def _write_config(self) -> Path:
        self.storage.mkdir(parents=True, exist_ok=True)
        htpasswd = self.root / "htpasswd"
        htpasswd.write_text(f"{USERNAME}:{bcrypt_hash(self.password)}\n")
        htpasswd.chmod(0o600)
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {
                "addr": self.host,
                # Signs upload state between requests; random, as one process serves them all.
                "secret": secrets.token_hex(16),
                "tls": {"certificate": str(self.tls.cert), "key": str(self.tls.key)},
            },
            "auth": {"htpasswd": {"realm": "jobtide-testbed", "path": str(htpasswd)}},
        }
        path = self.root / "config.yml"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def start(self) -> Registry:
        self.process.start()
        wait_for(self._ready, timeout=30, what="registry")
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _ready(self) -> bool:
        self.process.check_alive()
        # The API root answers 401 to a client without credentials once it serves.
        response = requests.get(f"https://{self.host}/v2/", verify=str(self.ca), timeout=2)
        return response.status_code == 401

    def get(self, path: str, *, password: str | None = None, accept: str = "") -> requests.Response:
        """GET `/v2/{path}` as the registry's user (with `password`, its own by default)."""
        return requests.get(
            f"https://{self.host}/v2/{path}",
            auth=(USERNAME, self.password if password is None else password),
            headers={"Accept": accept} if accept else {},
            verify=str(self.ca),
            timeout=10,
        )

    def access_log(self) -> list[str]:
        """The registry's access log so far, one line a request (`"GET /v2/... HTTP/1.1" 200`):
        what a test reads to see who fetched what and whether the registry let them."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if '"' in line and not line.startswith("time=")]

    def helm(
        self,
        config: Path,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        namespace: str | None = None,
    ) -> str:
        """helm trusting the registry's CA, with the registry credentials of `config` (a file
        of the test's, never the user's own); returns its output."""
        result = helm(
            *args, "--registry-config", str(config), "--ca-file", str(self.ca),
            stdin=stdin, check=check, kubeconfig=kubeconfig, namespace=namespace,
        )  # fmt: skip
        return result.stdout + result.stderr

    def helm_login(self, config: Path, password: str | None = None) -> str:
        """`helm registry login` as the registry's user (with `password`, its own by
        default), saved in `config`; returns helm's output (fails when helm does)."""
        return self.helm(
            config, "registry", "login", self.host, "--username", USERNAME, "--password-stdin",
            stdin=self.password if password is None else password, check=password is None,
        )  # fmt: skip

    def hosts_toml(self, *, push: bool = False) -> str:
        """containerd's hosts.toml for this registry (under a registry `config_path`, or
        `ctr --hosts-dir`): HTTPS with the test bed's CA (containerd would speak plain HTTP to
        a loopback registry otherwise); pull only unless `push`."""
        capabilities = ["pull", "resolve", *(["push"] if push else [])]
        return (
            f'server = "https://{self.host}"\n\n'
            f'[host."https://{self.host}"]\n'
            f"  capabilities = {json.dumps(capabilities)}\n"
            f'  ca = "{self.ca}"\n'
        )
