"""Child processes of the test bed: free ports, logs in a folder, clean stops."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll `check` every `interval` seconds until it returns True; raise TimeoutError naming
    `what` (and the last error `check` raised) when `timeout` passes first. An error is a
    reason to look again (the thing is still coming up), except a failed assertion, which
    ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except AssertionError:
            raise
        except Exception as e:  # the service is still coming up; keep the last reason
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last_error!r})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Process:
    """One long-running component. Runs in its own process group, so a stop reaches the
    children it spawned too; output goes to `<log_dir>/<name>.log`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check_alive(self) -> None:
        """Raise with the log's tail if the component exited."""
        if self._popen is not None and self._popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self._popen.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group, then SIGKILL what is left after `timeout`."""
        if self._popen is None:
            return
        stop_group(self._popen.pid, timeout=timeout, sig=sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=1)
        self._popen = None

    def kill(self) -> None:
        self.stop(timeout=0, sig=signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_group(pgid: int, *, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Signal process group `pgid` and wait for it to empty, SIGKILL after `timeout`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    # Reap our own zombie child if it is the group leader, then probe the group.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    check: bool = True,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command, returning its output; raise with the output on failure."""
    proc = subprocess.run(
        list(argv), env=env, input=stdin, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
