"""Container images without a registry: a private Docker engine, a Debian base image made
with debootstrap, builds of jobtide's Dockerfiles, and `docker save` tars for containerd.

Nothing can be pulled on these machines, so every Dockerfile of the project takes its base as
`ARG BASE_IMAGE` and the test bed passes `BASE_IMAGE` (`jobtide-testbed/base:bookworm`).

The engine is private to the test bed: its own data root, exec root, socket and pidfile under
`$JOBTIDE_CACHE/docker`, no bridge and no iptables rules (builds and containers use the host
network), so it never touches a system Docker. The data root survives runs, so the base image
and the build cache are reused. One engine at a time may own the data root: `DockerDaemon`
holds a lock on it while it runs, and a second user waits for it.

Builds that install from PyPI go through this machine's TLS-intercepting proxy; its CA (the
host bundle) is handed to the build as a BuildKit secret `pip-ca`, so no image contains it.

    with DockerDaemon() as daemon:
        builder = ImageBuilder(daemon)
        base = builder.ensure_base()
        builder.build(REPO / "images/worker/Dockerfile", REPO / "images/worker",
                      "jobtide/worker:test", {"BASE_IMAGE": base})
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from jobtide_testbed.process import run, wait_for
from jobtide_testbed.tools import CACHE, REPO, ensure_stage

BASE_IMAGE = "jobtide-testbed/base:bookworm"
DEBIAN_SUITE = "bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Debian's client: its built-in BuildKit handles `--secret` without the buildx plugin.
DOCKER_CLI = "/usr/bin/docker"


class DockerDaemon:
    """A private dockerd. Use as a context manager or call start()/stop()."""

    def __init__(self, root: Path | None = None, *, start_timeout: float = 60) -> None:
        self.root = root or CACHE / "docker"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.start_timeout = start_timeout
        self._lock: IO[str] | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for docker commands against this engine."""
        env = dict(os.environ)
        env.update(DOCKER_HOST=self.host, DOCKER_BUILDKIT="1")
        env.pop("DOCKER_CONTEXT", None)
        return env

    def docker(
        self, *args: str, timeout: float = 600, check: bool = True, input_file: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        if input_file is None:
            return run([DOCKER_CLI, *args], env=self.env(), timeout=timeout, check=check)
        with input_file.open("rb") as stdin:
            proc = subprocess.run(
                [DOCKER_CLI, *args],
                env=self.env(),
                stdin=stdin,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        result = subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)} exited {proc.returncode}\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def start(self, lock_timeout: float = 900) -> DockerDaemon:
        ensure_stage("docker")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.root / "owner.lock", lock_timeout)
        try:
            self._stop_leftover()
            with self.log_path.open("ab") as log:
                log.write(b"\n==== start dockerd\n")
                log.flush()
                self._popen = subprocess.Popen(
                    [
                        "dockerd",
                        f"--data-root={self.data_root}",
                        f"--exec-root={self.exec_root}",
                        f"--host={self.host}",
                        f"--pidfile={self.pidfile}",
                        "--bridge=none",
                        "--iptables=false",
                        "--ip6tables=false",
                        "--ip-masq=false",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )

            def ready() -> bool:
                if self._popen is not None and self._popen.poll() is not None:
                    raise RuntimeError(
                        f"dockerd exited {self._popen.returncode}; see {self.log_path}"
                    )
                return self.docker("version", timeout=10, check=False).returncode == 0

            wait_for(ready, timeout=self.start_timeout, what="dockerd", interval=0.3)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._popen is not None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait(timeout=10)
            self._popen = None
            self._unmount_exec_root()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _unmount_exec_root(self) -> None:
        """dockerd leaves its network namespace (exec-root/netns/default) mounted when it
        exits; unmounted, the cache can be deleted with a plain `rm -rf`."""
        prefix = f"{self.exec_root}/"
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mount_point = line.split()[1]
            if mount_point.startswith(prefix):
                run(["umount", "--lazy", mount_point], check=False, timeout=30)

    def _stop_leftover(self) -> None:
        """A dockerd left by a crashed run still holds the data root: stop it. We hold the
        owner lock, so it cannot belong to a live test session."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return
        if not any(arg == f"--pidfile={self.pidfile}".encode() for arg in cmdline):
            return
        os.kill(pid, signal.SIGTERM)
        wait_for(
            lambda: not Path(f"/proc/{pid}").exists(),
            timeout=30,
            what=f"leftover dockerd {pid} to stop",
        )

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _acquire_lock(path: Path, timeout: float) -> IO[str]:
    lock = path.open("a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise TimeoutError(f"{path} held by another session for {timeout:.0f} s") from None
            time.sleep(1)


def debian_mirror(sources_dir: Path = Path("/etc/apt/sources.list.d")) -> str:
    """The Debian mirror apt uses on this machine (deb822 `.sources` or one-line `.list`)."""
    for path in sorted(sources_dir.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, _, value = line.partition(":")
                if not line.startswith("#") and value:
                    fields[key.strip()] = value.strip()
            if DEBIAN_SUITE in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources_dir.glob("*.list"))]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            match = re.match(rf"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{DEBIAN_SUITE}\s", line)
            if match:
                return match.group(1)
    raise RuntimeError(f"no Debian {DEBIAN_SUITE} mirror in apt's sources")


class ImageBuilder:
    """Builds and exports images on one DockerDaemon."""

    def __init__(self, daemon: DockerDaemon, *, ca_bundle: Path = HOST_CA_BUNDLE) -> None:
        self.daemon = daemon
        self.ca_bundle = ca_bundle

    def exists(self, tag: str) -> bool:
        return self.daemon.docker("image", "inspect", tag, check=False).returncode == 0

    def ensure_base(self, tag: str = BASE_IMAGE) -> str:
        """Debian minbase with python3 and venv, made once and kept in the data root."""
        if self.exists(tag):
            return tag
        lock = _acquire_lock(self.daemon.root / "base.lock", 900)
        try:
            if self.exists(tag):
                return tag
            with tempfile.TemporaryDirectory(dir=self.daemon.root) as tmp:
                rootfs = Path(tmp) / "rootfs"
                run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates",
                        DEBIAN_SUITE,
                        str(rootfs),
                        debian_mirror(),
                    ],
                    timeout=1200,
                )
                # Package caches and lists are of no use in an image.
                for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for entry in (rootfs / cache).glob("*"):
                        if entry.is_file():
                            entry.unlink()
                tarball = Path(tmp) / "rootfs.tar"
                run(
                    ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."],
                    timeout=600,
                )
                self.daemon.docker(
                    "import",
                    "--change",
                    'CMD ["/bin/bash"]',
                    "-",
                    tag,
                    input_file=tarball,
                    timeout=600,
                )
        finally:
            lock.close()
        return tag

    def import_root(self, root: Path, tag: str) -> str:
        """A directory tree (a Debian root the set-up built) as image `tag`, once."""
        if self.exists(tag):
            return tag
        lock = _acquire_lock(self.daemon.root / "base.lock", 900)
        try:
            if not self.exists(tag):
                with tempfile.TemporaryDirectory(dir=self.daemon.root) as tmp:
                    tarball = Path(tmp) / "rootfs.tar"
                    run(
                        ["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."],
                        timeout=600,
                    )
                    self.daemon.docker("import", "-", tag, input_file=tarball, timeout=600)
        finally:
            lock.close()
        return tag

    def build(
        self,
        dockerfile: Path,
        context: Path,
        tag: str,
        build_args: Mapping[str, str] | None = None,
        *,
        extra_args: Sequence[str] = (),
        timeout: float = 1200,
    ) -> str:
        """`docker build` on the host network with the proxy's CA as secret `pip-ca`."""
        argv = [
            "build",
            "--network",
            "host",
            "--file",
            str(dockerfile),
            "--tag",
            tag,
            "--secret",
            f"id=pip-ca,src={self.ca_bundle}",
            "--progress",
            "plain",
        ]
        for name, value in (build_args or {}).items():
            argv += ["--build-arg", f"{name}={value}"]
        self.daemon.docker(*argv, *extra_args, str(context), timeout=timeout)
        return tag

    def save(self, tag: str, destination: Path) -> Path:
        """Export `tag` as a `docker save` tar (for `ctr images import`)."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.daemon.docker("save", "--output", str(destination), tag, timeout=600)
        return destination


WORKER_IMAGE = "jobtide/worker:test"
HELLO_IMAGE = "jobtide/worker-hello:test"
# The chaos run's handler, reporting each attempt to a ledger on the host (ledger.py).
LEDGER_IMAGE = "jobtide/worker-ledger:test"
LEDGER_HANDLER_DIR = Path(__file__).with_name("ledger_handler")
SCALER_IMAGE = "jobtide/scaler:test"


def worker_images(builder: ImageBuilder) -> list[str]:
    """The worker base image on the test bed's Debian base, and the hello example on it."""
    base = builder.ensure_base()
    worker_dir = REPO / "images" / "worker"
    builder.build(worker_dir / "Dockerfile", worker_dir, WORKER_IMAGE, {"BASE_IMAGE": base})
    hello_dir = worker_dir / "examples" / "hello"
    builder.build(hello_dir / "Dockerfile", hello_dir, HELLO_IMAGE, {"BASE_IMAGE": WORKER_IMAGE})
    return [WORKER_IMAGE, HELLO_IMAGE]


def ledger_images(builder: ImageBuilder) -> list[str]:
    """The ledger handler's worker image (tests/e2e/test_chaos.py), on the worker base."""
    worker_images(builder)
    builder.build(
        LEDGER_HANDLER_DIR / "Dockerfile", LEDGER_HANDLER_DIR, LEDGER_IMAGE,
        {"BASE_IMAGE": WORKER_IMAGE},
    )  # fmt: skip
    return [LEDGER_IMAGE]


def scaler_image(builder: ImageBuilder) -> str:
    """The scaler image on the test bed's Debian base. Its context is images/: the scaler
    package depends on the worker package (the queue topology)."""
    base = builder.ensure_base()
    builder.build(
        REPO / "images" / "scaler" / "Dockerfile", REPO / "images", SCALER_IMAGE,
        {"BASE_IMAGE": base},
    )  # fmt: skip
    return SCALER_IMAGE


def load_into(
    load: Callable[[Path], None], build: Callable[[ImageBuilder], list[str]], workdir: Path
) -> list[str]:
    """Build images with `build`, `docker save` each and hand the tar to `load` (a node's
    containerd import); the engine is stopped before loading. Returns the tags."""
    workdir.mkdir(parents=True, exist_ok=True)
    with DockerDaemon() as daemon:
        builder = ImageBuilder(daemon)
        tags = build(builder)
        tars = [builder.save(tag, workdir / f"image-{i}.tar") for i, tag in enumerate(tags)]
    for tar in tars:
        load(tar)
        tar.unlink()
    return tags


def image_facts(daemon: DockerDaemon, tag: str) -> dict[str, object]:
    """What every jobtide image promises, as observed: its configured user, its exec-form
    entrypoint, its OCI title, and, from a read-only run, the uid it runs as and how many
    build secrets were left behind."""
    [inspected] = json.loads(daemon.docker("image", "inspect", tag).stdout)
    config = inspected["Config"]
    secrets_left, uid = daemon.docker(
        "run", "--rm", "--read-only", "--network", "none", "--entrypoint", "/bin/sh", tag,
        "-c", "ls /run/secrets 2>/dev/null | wc -l; id -u",
    ).stdout.split()  # fmt: skip
    return {
        "user": config["User"],
        "entrypoint": config["Entrypoint"],
        "title": config["Labels"]["org.opencontainers.image.title"],
        "uid": uid,
        "secrets_left": secrets_left,
    }
