"""`python -m jobtide_scaler status -n NS RELEASE [--watch [SECONDS]] [-o json]` (and
`kubectl jobtide status ...`): the release's status from the apiserver alone, with the user's
kubeconfig. It reads three things, each with one request: the status ConfigMap (the leader's
latest figures, status.py), the Lease (who leads now) and the worker Jobs (how many run now,
counted by the scaler's own code). No port of the scaler, no broker credentials."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from jobtide_scaler.jobs import LABEL_COMPONENT, LABEL_INSTANCE, cache_selector
from jobtide_scaler.jobstate import JobCounts, count_jobs, record_of
from jobtide_scaler.status import (
    STATUS_KEY,
    LeaseInfo,
    StatusDocument,
    StatusView,
    format_json,
    format_table,
    parse_rfc3339,
)

# The component label the chart puts on the status ConfigMap, beside the release's instance
# label: the command finds it whatever nameOverride or fullnameOverride made of its name (the
# chart's render tests check that the two agree).
STATUS_COMPONENT = "scaler-status"
REQUEST_TIMEOUT = (3.0, 10.0)
DEFAULT_WATCH_SECONDS = 2.0
EXIT_NOT_FOUND = 1
# Clears the terminal between two refreshes of --watch (only when it is a terminal).
CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("release", help="the Helm release")
    parser.add_argument(
        "-n", "--namespace", help="the release's namespace (default: the context's)"
    )
    parser.add_argument(
        "-w",
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"print again every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until interrupted",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="json: one JSON document per refresh",
    )
    parser.add_argument("--kubeconfig", help="the kubeconfig file (default: $KUBECONFIG)")
    parser.add_argument("--context", help="the kubeconfig context to use")


def status_selector(release: str) -> str:
    return f"{LABEL_INSTANCE}={release},{LABEL_COMPONENT}={STATUS_COMPONENT}"


def _reason(error: BaseException) -> str:
    if isinstance(error, k8s.ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


class StatusReader:
    """One view of a release from the apiserver, as the user."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str, release: str) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.release = release

    def read(self) -> StatusView:
        """Raises LookupError when the release has no status ConfigMap."""
        problems: list[str] = []
        document = self._document(problems)
        lease = None
        if document is not None and document.lease_name is not None:
            lease = self._lease(document.lease_name, problems)
        jobs = self._jobs(problems)
        return StatusView(
            self.release, self.namespace, document, lease, jobs, problems=tuple(problems)
        )

    @staticmethod
    def _get(call: Callable[[], Any]) -> Any:
        """One request's JSON, unparsed by the client's models (_preload_content=False)."""
        return json.loads(call().data)

    def _document(self, problems: list[str]) -> StatusDocument | None:
        listed = self._get(
            lambda: self.core.list_namespaced_config_map(
                self.namespace,
                label_selector=status_selector(self.release),
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        items = listed.get("items") or []
        if not items:
            raise LookupError(
                f"no status ConfigMap of release {self.release} in namespace {self.namespace} "
                f"(selector {status_selector(self.release)}): not a jobtide release, or a "
                "chart version without the status view"
            )
        text = (items[0].get("data") or {}).get(STATUS_KEY)
        if not text:
            return None
        try:
            return StatusDocument.from_json(text)
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"status figures unreadable: {e}")
            return None

    def _lease(self, name: str, problems: list[str]) -> LeaseInfo | None:
        try:
            lease = self._get(
                lambda: self.coordination.read_namespaced_lease(
                    name,
                    self.namespace,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except k8s.ApiException as e:
            if e.status == 404:
                return LeaseInfo(None, None, None)  # no replica has led yet
            problems.append(f"Lease {name}: {_reason(e)}")
            return None
        spec = lease.get("spec") or {}
        renewed = spec.get("renewTime")
        return LeaseInfo(
            holder=spec.get("holderIdentity") or None,
            renewed_at=parse_rfc3339(renewed) if renewed else None,
            duration_seconds=spec.get("leaseDurationSeconds"),
        )

    def _jobs(self, problems: list[str]) -> dict[str, JobCounts] | None:
        try:
            listed = self._get(
                lambda: self.batch.list_namespaced_job(
                    self.namespace,
                    label_selector=cache_selector(self.release),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except k8s.ApiException as e:
            problems.append(f"worker Jobs: {_reason(e)}; WORKERS from the figures")
            return None
        return count_jobs([record_of(item) for item in listed.get("items") or []])


def api_client_for(kubeconfig: str | None, context: str | None) -> tuple[k8s.ApiClient, str]:
    """The user's client and the context's namespace (kubectl's rules: `default` if unset)."""
    configuration = k8s.Configuration()
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    _, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    if context is not None:
        contexts, _ = k8s_config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        active = next((c for c in contexts if c["name"] == context), active)
    namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return k8s.ApiClient(configuration), namespace


def run(
    options: argparse.Namespace,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    api_client, context_namespace = api_client_for(options.kubeconfig, options.context)
    reader = StatusReader(api_client, options.namespace or context_namespace, options.release)
    formatter = format_json if options.output == "json" else format_table
    clear = options.watch is not None and options.output == "table" and out.isatty()
    try:
        while True:
            try:
                view = reader.read()
            except LookupError as e:
                print(e, file=err)
                return EXIT_NOT_FOUND
            except (k8s.ApiException, OSError) as e:
                if options.watch is None:
                    print(f"reading the release's status: {_reason(e)}", file=err)
                    return EXIT_NOT_FOUND
                # Watching: a failed read is shown and retried at the next refresh.
                print(f"reading the release's status: {_reason(e)}", file=err)
            else:
                out.write((CLEAR if clear else "") + formatter(view, clock()))
                out.flush()
            if options.watch is None:
                return 0
            sleep(options.watch)
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jobtide-scaler status",
        description="Per pipeline: queue, workers against their caps, the scaler's last "
        "decision and why, the leader, and how old the figures are.",
    )
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def kubectl_plugin() -> int:
    """`kubectl jobtide status ...`: kubectl runs `kubectl-jobtide` with the words after
    `jobtide`."""
    args = sys.argv[1:]
    if args[:1] != ["status"]:
        print("usage: kubectl jobtide status [-n NAMESPACE] RELEASE [--watch [SECONDS]] "
              "[-o json]", file=sys.stderr)  # fmt: skip
        return 2
    return main(args[1:])
