"""Leader election on a coordination.k8s.io Lease, so that of several replicas only one
creates Jobs.

The rules follow client-go's: a candidate takes the Lease only when its holder has not renewed
it for `leaseDurationSeconds`, timed on the candidate's own clock from the moment it last saw
the Lease change (no trust in other machines' clocks); every write carries the resourceVersion
read, so two candidates cannot both win. The leader stops acting as soon as its last
successful renewal is `renewDeadlineSeconds` old, which is shorter than the lease duration:
it has stopped before anyone else may start."""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

from jobtide_scaler.config import LeaderElectionSettings

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (2.0, 5.0)


def default_identity() -> str:
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class LeaderElector:
    def __init__(
        self,
        api_client: k8s.ApiClient,
        namespace: str,
        settings: LeaderElectionSettings,
        *,
        identity: str | None = None,
        on_request: Callable[[str], None] = lambda verb: None,
        on_error: Callable[[str], None] = lambda kind: None,
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.settings = settings
        self.identity = identity or default_identity()
        self._on_request = on_request
        self._on_error = on_error
        self._on_change = on_change
        self._clock = clock
        self._renewed_at: float | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._was_leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and (
            self._clock() - renewed < self.settings.renew_deadline_seconds
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning; a leader hands the Lease back so a successor need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.retry_period_seconds + 6)
        if self.is_leader():
            self._release()
        self._renewed_at = None
        self._notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as e:
                self._on_error("leader_election")
                log.warning("leader election: %s", e)
            self._notify()
            self._stop.wait(self.settings.retry_period_seconds)

    def _notify(self) -> None:
        leading = self.is_leader()
        if leading != self._was_leading:
            self._was_leading = leading
            log.info(
                "%s %s the lease %s",
                self.identity,
                "now holds" if leading else "no longer holds",
                self.settings.lease_name,
            )
            self._on_change(leading)

    def try_acquire_or_renew(self) -> bool:
        """One round; True if this replica holds the Lease afterwards."""
        started = self._clock()
        now = datetime.datetime.now(datetime.UTC)
        name = self.settings.lease_name
        self._on_request("get")
        try:
            lease = self.api.read_namespaced_lease(
                name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            if e.status != 404:
                raise
            return self._create(started, now)

        spec = lease.spec or k8s.V1LeaseSpec()
        holder = spec.holder_identity or ""
        observed = (
            holder,
            spec.renew_time,
            (lease.metadata or k8s.V1ObjectMeta()).resource_version,
        )
        if observed != self._observed:
            self._observed, self._observed_at = observed, started
        duration = spec.lease_duration_seconds or self.settings.lease_duration_seconds
        if holder and holder != self.identity and started - self._observed_at < duration:
            self._renewed_at = None
            return False

        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.settings.lease_duration_seconds)
        lease.spec = spec
        self._on_request("update")
        try:
            # The resourceVersion read above makes this a compare-and-swap.
            self.api.replace_namespaced_lease(
                name, self.namespace, lease, _request_timeout=REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            if e.status == 409:
                self._renewed_at = None
                return False
            raise
        self._renewed_at = started
        return True

    def _create(self, started: float, now: datetime.datetime) -> bool:
        lease = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name=self.settings.lease_name, namespace=self.namespace),
            spec=k8s.V1LeaseSpec(
                holder_identity=self.identity,
                acquire_time=now,
                renew_time=now,
                lease_duration_seconds=int(self.settings.lease_duration_seconds),
                lease_transitions=0,
            ),
        )
        self._on_request("create")
        try:
            self.api.create_namespaced_lease(
                self.namespace, lease, _request_timeout=REQUEST_TIMEOUT
            )
        except k8s.ApiException as e:
            if e.status == 409:
                return False
            raise
        self._renewed_at = started
        return True

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._on_request("get")
            lease = self.api.read_namespaced_lease(
                self.settings.lease_name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.datetime.now(datetime.UTC)
            self._on_request("update")
            self.api.replace_namespaced_lease(
                self.settings.lease_name, self.namespace, lease, _request_timeout=REQUEST_TIMEOUT
            )
            log.info("%s released the lease %s", self.identity, self.settings.lease_name)
