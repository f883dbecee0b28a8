"""The Kubernetes side: a watch-backed cache of the release's worker Jobs (one list and one
watch for all pipelines, never a list per pipeline per cycle), Job creation and the trimming of
old failed Jobs. A Job's state and the counts per pipeline come from its status alone
(jobstate.py, pure).

Objects are kept as small records parsed from the raw JSON: the client's model objects for
1,000 Jobs would cost tens of MiB and much CPU per watch event."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import enum
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from jobtide_scaler.events import Event
from jobtide_scaler.jobs import MANAGER
from jobtide_scaler.jobstate import JobCounts, JobRecord, JobState, count_jobs, record_of
from jobtide_scaler.retry import retry_after
from jobtide_scaler.status import STATUS_KEY

log = logging.getLogger(__name__)

# Seconds: the create call's own deadline; a slower answer counts as an unknown outcome.
CREATE_TIMEOUT = (3.0, 10.0)
LIST_TIMEOUT = (3.0, 30.0)
# The server ends a watch after this many seconds; the client gives up on a silent one later.
WATCH_SECONDS = 240
WATCH_READ_TIMEOUT = WATCH_SECONDS + 30
LIST_PAGE_SIZE = 200
MAX_BACKOFF = 8.0
# How long create ids seen in any watch event are remembered (see loop.CreateLedger).
SEEN_CREATE_IDS_SECONDS = 900.0


@dataclass(frozen=True)
class CacheSnapshot:
    synced: bool
    counts: dict[str, JobCounts]
    # Create ids of Jobs seen in any event recently, including Jobs deleted since.
    seen_create_ids: frozenset[str]
    failed: dict[str, list[JobRecord]]


class CreateOutcome(enum.Enum):
    CREATED = "created"
    REJECTED = "rejected"  # the apiserver answered: nothing was created
    UNKNOWN = "unknown"  # no clear answer: the Job may or may not exist


@dataclass(frozen=True)
class CreateResult:
    outcome: CreateOutcome
    name: str = ""  # "" when the apiserver said Created but its answer could not be read
    reason: str = ""
    retry_after: float | None = None  # the apiserver asked to wait this long (429)


def load_api_client() -> k8s.ApiClient:
    """In a pod: its ServiceAccount. Elsewhere (tests, development): KUBECONFIG."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # No transparent retries: the outcome of every create must be known to the ledger, and
    # the loop does its own back-off.
    configuration.retries = False
    return k8s.ApiClient(configuration)


def _unwrap(error: BaseException) -> BaseException:
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, BaseException) else error


def retry_after_of(error: BaseException) -> float | None:
    """The Retry-After of a 429 or 503 answer (API Priority and Fairness sends it), if any."""
    if not isinstance(error, k8s.ApiException) or error.status not in (429, 503):
        return None
    headers = error.headers or {}
    return retry_after(headers.get("Retry-After"))


def create_outcome_of(error: BaseException) -> CreateOutcome:
    """Whether a failed create call could have created the Job anyway."""
    if isinstance(error, k8s.ApiException):
        # An answer below 500 is a definite refusal (429 included). A 5xx may come after the
        # object was stored (a 504 from the apiserver's own timeout, an etcd error after the
        # write): unknown.
        if error.status and 0 < error.status < 500:
            return CreateOutcome.REJECTED
        return CreateOutcome.UNKNOWN
    cause = _unwrap(error)
    # The connection was never made, so the request was never sent.
    if isinstance(cause, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
        return CreateOutcome.REJECTED
    if isinstance(cause, urllib3.exceptions.ConnectTimeoutError):
        return CreateOutcome.REJECTED
    return CreateOutcome.UNKNOWN


class Cluster:
    """Everything the scaler asks of the apiserver about worker Jobs."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        namespace: str,
        selector: str,
        *,
        on_request: Callable[[str], None] = lambda verb: None,
        on_error: Callable[[str], None] = lambda kind: None,
        create_timeout: tuple[float, float] = CREATE_TIMEOUT,
    ) -> None:
        self.batch = k8s.BatchV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.create_timeout = create_timeout
        self.namespace = namespace
        self.selector = selector
        self._on_request = on_request
        self._on_error = on_error
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._seen: dict[str, float] = {}
        self._synced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None

    # --- the cache ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="job-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
                response.release_conn()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.synced:
                return True
            time.sleep(0.05)
        return self.synced

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._synced

    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            self._prune_seen(time.monotonic())
            records = list(self._records.values())
            synced = self._synced
            seen = frozenset(self._seen)
        failed: dict[str, list[JobRecord]] = {}
        for record in records:
            if record.state is JobState.FAILED:
                failed.setdefault(record.pipeline, []).append(record)
        return CacheSnapshot(synced, count_jobs(records), seen, failed)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                version: str | None = self._list()
                backoff = 0.5
                while version is not None and not self._stop.is_set():
                    # None: the server says our version is too old, so list again.
                    version = self._watch(version)
            except Exception as e:
                if self._stop.is_set():
                    return
                wait = retry_after_of(e)
                self._on_error("kubernetes_throttled" if wait is not None else "kubernetes_watch")
                backoff = max(backoff, wait or 0.0)
                log.warning("Job cache: %s; listing again in %.1f s", _describe(e), backoff)
            with self._lock:
                self._synced = False
            self._stop.wait(backoff)
            # Capped near a cycle: once a fault ends the cache is back within a cycle or two.
            # The server can ask for longer with Retry-After, which is honoured above.
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _list(self) -> str:
        """Replace the cache with a fresh list, page by page: one response for thousands of
        Jobs would be parsed into memory all at once."""
        records = {}
        token: str | None = None
        while True:
            self._on_request("list")
            # Raw JSON (_preload_content=False): see the module's note on memory.
            response: Any = self.batch.list_namespaced_job(
                self.namespace,
                label_selector=self.selector,
                limit=LIST_PAGE_SIZE,
                _continue=token,
                _preload_content=False,
                _request_timeout=LIST_TIMEOUT,
            )
            body = json.loads(response.data)
            for item in body.get("items") or []:
                record = record_of(item)
                records[record.uid] = record
            metadata = body["metadata"]
            token = metadata.get("continue")
            del body, response
            if not token:
                break
        now = time.monotonic()
        with self._lock:
            self._records = records
            for record in records.values():
                if record.create_id:
                    self._seen[record.create_id] = now
            self._prune_seen(now)
            self._synced = True
        _return_freed_memory()
        # A paged list is consistent: every page is of the first page's resourceVersion.
        resource_version: str = metadata["resourceVersion"]
        return resource_version

    def _watch(self, resource_version: str) -> str | None:
        """Follow changes until the server ends the watch. The next version to watch from,
        or None if the cache must list again."""
        self._on_request("watch")
        response: Any = self.batch.list_namespaced_job(
            self.namespace,
            label_selector=self.selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(LIST_TIMEOUT[0], WATCH_READ_TIMEOUT),
        )
        self._response = response
        try:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                resource_version = (obj.get("metadata") or {}).get(
                    "resourceVersion", resource_version
                )
                if kind == "BOOKMARK":
                    continue
                self._apply(kind, obj)
        finally:
            self._response = None
            response.release_conn()
        return resource_version

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        record = record_of(obj)
        now = time.monotonic()
        with self._lock:
            if record.create_id:
                self._seen[record.create_id] = now
            if kind == "DELETED":
                self._records.pop(record.uid, None)
            else:
                self._records[record.uid] = record

    def _prune_seen(self, now: float) -> None:
        for create_id, seen_at in list(self._seen.items()):
            if now - seen_at > SEEN_CREATE_IDS_SECONDS:
                del self._seen[create_id]

    def read_deployment(self, name: str) -> dict[str, Any]:
        """One Deployment of the namespace as plain JSON (the owner of the worker Jobs)."""
        self._on_request("get")
        response: Any = self.apps.read_namespaced_deployment(
            name, self.namespace, _preload_content=False, _request_timeout=LIST_TIMEOUT
        )
        deployment: dict[str, Any] = json.loads(response.data)
        return deployment

    # --- writes ------------------------------------------------------------------------

    def post_event(self, owner: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event about `owner` (an owner reference), as `kubectl describe` shows
        them; the scaler's pod name is the reporting instance."""
        self._on_request("create")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{owner['name']}.", "namespace": self.namespace},
            "involvedObject": {**owner, "namespace": self.namespace},
            "reason": event.reason,
            "message": event.message,
            "type": "Warning" if event.warning else "Normal",
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(
            self.namespace,
            body,  # type: ignore[arg-type]
            _preload_content=False,
            _request_timeout=CREATE_TIMEOUT,
        )

    def write_status(self, config_map: str, text: str) -> None:
        """Replace the status document (status.py) in the release's status ConfigMap. A
        merge patch of that one key: the chart owns the ConfigMap and its other fields, and
        the Role allows `patch` on that one name only."""
        self._on_request("patch")
        self.core.patch_namespaced_config_map(
            config_map,
            self.namespace,
            {"data": {STATUS_KEY: text}},
            field_manager=MANAGER,
            _content_type="application/merge-patch+json",
            _preload_content=False,
            _request_timeout=CREATE_TIMEOUT,
        )

    def create_job(self, manifest: Mapping[str, Any]) -> CreateResult:
        self._on_request("create")
        try:
            response: Any = self.batch.create_namespaced_job(
                self.namespace,
                # A plain dict is a valid body; the client's annotation says V1Job.
                manifest,  # type: ignore[arg-type]
                _preload_content=False,
                _request_timeout=self.create_timeout,
            )
        except Exception as e:
            return CreateResult(
                create_outcome_of(e), reason=_describe(e), retry_after=retry_after_of(e)
            )
        try:
            # The body is read here (the status line was read by the call): a connection cut
            # in the middle of it raises urllib3's ProtocolError, a cut JSON a ValueError.
            name = str(json.loads(response.data)["metadata"]["name"])
        except Exception as e:
            # The apiserver said Created: the Job exists, whatever became of the answer's body.
            # Counting it as failed would let the next cycle create it a second time.
            self._on_error("kubernetes_answer_invalid")
            log.warning("a Job was created but the answer could not be read: %s", _describe(e))
            return CreateResult(CreateOutcome.CREATED)
        return CreateResult(CreateOutcome.CREATED, name=name)

    def delete_failed_job(self, record: JobRecord) -> None:
        """Delete one failed Job and its pods; the uid precondition guarantees that it is
        the very Job the cache saw failed, never a newer one of the same name."""
        self._on_request("delete")
        try:
            self.batch.delete_namespaced_job(
                record.name,
                self.namespace,
                body=k8s.V1DeleteOptions(
                    propagation_policy="Background",
                    preconditions=k8s.V1Preconditions(uid=record.uid),
                ),
                _request_timeout=CREATE_TIMEOUT,
            )
        except k8s.ApiException as e:
            # Already gone (its TTL, or our delete of the last cycle not yet in the cache).
            if e.status != 404:
                raise


def _return_freed_memory() -> None:
    """Hand the list's parsed JSON, now garbage, back to the system: glibc keeps freed heap
    memory otherwise, and the scaler's resident size would stay at its peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _describe(error: BaseException) -> str:
    if isinstance(error, k8s.ApiException):
        return f"HTTP {error.status} {error.reason}"
    cause = _unwrap(error)
    return f"{type(cause).__name__}: {cause}"
