"""An OCI registry on the test bed: the CNCF distribution registry (`ci/setup registry`), on a
free loopback port, serving TLS with a certificate of its own CA and asking for a password
(htpasswd, bcrypt). Charts go in with `helm push` and out with `helm install oci://...`;
images go in with `Registry.push_copy` and the real node's containerd pulls them with a
Secret, as a cluster pulls from a private registry.

The node's containerd runs on the host, so a loopback address reaches the registry from it.

`push_copy` pushes a copy of an image (read from a node's content store) whose every layer
carries one file more in front, so no node holds its layers: a node that pulls it fetches every
one of them from the registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import requests
import yaml

from jobtide_testbed.pki import PKI
from jobtide_testbed.process import Process, free_port, wait_for
from jobtide_testbed.tools import helm, tool

# The one account the registry knows.
USERNAME = "jobtide"
# What `push_copy` writes, and the layers it can copy: uncompressed tars, as `docker save`
# makes them and `ctr images import` keeps them.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
TAR_LAYERS = (OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar")
INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# The file `push_copy` puts in front of every layer (its content makes the layer the copy's).
COPY_MARKER = ".jobtide-registry-copy"
# One `key=value` (value quoted or bare) of the registry's text log lines.
LOG_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


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

    def log_length(self) -> int:
        """Lines the registry has logged so far: what `records(since=...)` counts from."""
        return len(self.log_path.read_text(errors="replace").splitlines())

    def records(self, since: int = 0) -> list[dict[str, str]]:
        """The registry's own log lines after line `since`, as their fields: `msg`, and for
        a request the request's (`http.request.method`, `.uri`, `.useragent`), with
        `http.response.status` and `auth.user.name` when it succeeded (`msg` is then
        "response completed"; a refused password is "error authorizing context: ...")."""
        lines = self.log_path.read_text(errors="replace").splitlines()[since:]
        return [
            {key: value.strip('"') for key, value in LOG_FIELD.findall(line)}
            for line in lines
            if line.startswith("time=")
        ]

    def _api(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        data: bytes | BlobReader | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """A request to `/v2/{path}` as the registry's user; an error unless it succeeds."""
        response = requests.request(
            method, f"https://{self.host}/v2/{path}", params=params, data=data, headers=headers,
            auth=(USERNAME, self.password), verify=str(self.ca), timeout=300,
        )  # fmt: skip
        if response.status_code >= 300:
            raise RuntimeError(f"registry: {method} /v2/{path}: {response.status_code} "
                               f"{response.text[:500]}")  # fmt: skip
        return response

    def push_blob(self, repository: str, blob: Blob) -> None:
        """Upload `blob` into `repository` (one POST, then one PUT of the whole blob)."""
        started = self._api("POST", f"{repository}/blobs/uploads/")
        location = started.headers["Location"]
        path = location.split("/v2/", 1)[1]
        with blob.reader() as reader:
            self._api(
                "PUT", path, params={"digest": blob.digest}, data=reader,
                headers={"Content-Type": "application/octet-stream"},
            )  # fmt: skip

    def push_copy(
        self, blob_path: Callable[[str], Path], manifest: str, repository: str, tag: str,
        marker: str,
    ) -> PushedImage:  # fmt: skip
        """Push a copy of the image whose manifest (or index) is blob `manifest`, reading
        its blobs where `blob_path` says (a node's content store), as `repository:tag`.
        Each layer of the copy is the original with a file `COPY_MARKER` in front (read,
        never rewritten) holding `marker` and the copy's name, so every layer digest and the
        config are this copy's own (also where two images share a layer): pushed with a
        `marker` never used before, the copy's layers are on no node, and a node that pulls
        it fetches every one."""
        found = json.loads(blob_path(manifest).read_bytes())
        if found.get("mediaType") in INDEXES:
            [entry] = [
                m for m in found["manifests"]
                if m.get("platform", {}).get("os", "linux") == "linux"
                and m.get("platform", {}).get("architecture", "amd64") == "amd64"
            ]  # fmt: skip
            found = json.loads(blob_path(entry["digest"]).read_bytes())
        prefix = marker_member(f"{repository}:{tag} {marker}\n")
        layers = []
        for layer in found["layers"]:
            if layer["mediaType"] not in TAR_LAYERS:
                raise ValueError(
                    f"layer {layer['digest']}: mediaType {layer['mediaType']} is not an "
                    f"uncompressed tar ({', '.join(TAR_LAYERS)}); push_copy copies only those"
                )
            layers.append(Blob.of(prefix, blob_path(layer["digest"])))
        config = json.loads(blob_path(found["config"]["digest"]).read_bytes())
        # An uncompressed layer's diff ID is its digest.
        config["rootfs"]["diff_ids"] = [layer.digest for layer in layers]
        config_blob = Blob.of(json.dumps(config).encode())
        for blob in [*layers, config_blob]:
            self.push_blob(repository, blob)
        document = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_blob.descriptor(OCI_CONFIG),
                "layers": [layer.descriptor(OCI_LAYER) for layer in layers],
            }
        ).encode()
        self._api(
            "PUT", f"{repository}/manifests/{tag}", data=document,
            headers={"Content-Type": OCI_MANIFEST},
        )  # fmt: skip
        return PushedImage(
            reference=f"{self.host}/{repository}:{tag}",
            repository=repository,
            tag=tag,
            manifest=f"sha256:{hashlib.sha256(document).hexdigest()}",
            config=config_blob.digest,
            layers=[layer.digest for layer in layers],
        )

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

    def hosts_toml(self) -> str:
        """containerd's hosts.toml for this registry (under a registry `config_path`): HTTPS
        with the test bed's CA (containerd would speak plain HTTP to a loopback registry
        otherwise), pull only."""
        return (
            f'server = "https://{self.host}"\n\n'
            f'[host."https://{self.host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            f'  ca = "{self.ca}"\n'
        )


def marker_member(text: str) -> bytes:
    """A tar member, file `COPY_MARKER` holding `text`, as the bytes a tar begins with: put
    in front of a tar, the result is the same tar with this one file more."""
    data = text.encode()
    info = tarfile.TarInfo(COPY_MARKER)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * padding


@dataclass(frozen=True)
class Blob:
    """`head` then, when there is one, the bytes of file `tail`: what `push_blob` uploads,
    read from the file as it goes (a layer is never copied)."""

    head: bytes
    tail: Path | None
    digest: str
    size: int

    @classmethod
    def of(cls, head: bytes, tail: Path | None = None) -> Blob:
        digest = hashlib.sha256(head)
        size = len(head)
        if tail is not None:
            with tail.open("rb") as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        return cls(head, tail, f"sha256:{digest.hexdigest()}", size)

    def descriptor(self, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}

    def reader(self) -> BlobReader:
        return BlobReader(self)


class BlobReader(io.RawIOBase):
    """A `Blob`'s bytes as a file requests can send with its length (not chunked)."""

    def __init__(self, blob: Blob) -> None:
        super().__init__()
        self.blob = blob
        self._head = io.BytesIO(blob.head)
        self._tail = blob.tail.open("rb") if blob.tail is not None else None

    def __len__(self) -> int:
        return self.blob.size

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._head.read(size)
        if self._tail is not None and (size is None or size < 0 or len(data) < size):
            rest = -1 if size is None or size < 0 else size - len(data)
            data += self._tail.read(rest)
        return data

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
        super().close()


@dataclass(frozen=True)
class PushedImage:
    """An image `push_copy` pushed: `reference` (host/repository:tag) is what pods name."""

    reference: str
    repository: str
    tag: str
    manifest: str
    config: str
    layers: list[str]

    @property
    def pinned(self) -> str:
        """host/repository@manifest digest: what a pod that runs this copy reports as its
        `imageID`."""
        return f"{self.reference.rpartition(':')[0]}@{self.manifest}"
