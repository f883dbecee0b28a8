"""`python -m jobtide_scaler annotate -n NS KEY=VALUE POD...`: set one annotation on the
named pods. The chart's pre-delete hook runs it to mark every member of a clustered broker
`jobtide.io/uninstalling=true`, so that each member's pre-stop (which otherwise waits for its
quorum queues to keep a majority without it) lets it stop at once: an uninstall stops them all.
A pod that does not exist is reported and skipped; any other refusal fails the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubernetes import client as k8s

from jobtide_scaler.cluster import load_api_client

REQUEST_TIMEOUT = (3.0, 10.0)
EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jobtide-scaler annotate", description="Set one annotation on the named pods."
    )
    parser.add_argument("-n", "--namespace", required=True, help="the pods' namespace")
    parser.add_argument("annotation", help="KEY=VALUE")
    parser.add_argument("pods", nargs="+", metavar="POD", help="pod names")
    return parser.parse_args(list(argv))


def split_annotation(text: str) -> tuple[str, str]:
    """`KEY=VALUE` as its key and value; ValueError naming the problem otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"annotation {text!r}: expected KEY=VALUE")
    return key, value


def annotate(core: k8s.CoreV1Api, namespace: str, key: str, value: str, pods: list[str]) -> int:
    """Patch each pod; the number of pods annotated."""
    done = 0
    body = {"metadata": {"annotations": {key: value}}}
    for pod in pods:
        try:
            core.patch_namespaced_pod(pod, namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except k8s.ApiException as error:
            if error.status != 404:
                raise
            print(f"pod {namespace}/{pod}: not found, skipped", file=sys.stderr)
            continue
        print(f"pod {namespace}/{pod}: {key}={value}")
        done += 1
    return done


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    try:
        key, value = split_annotation(options.annotation)
    except ValueError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    core = k8s.CoreV1Api(load_api_client())
    try:
        annotate(core, options.namespace, key, value, list(options.pods))
    except k8s.ApiException as error:
        problem = f"{error.status} {error.reason}"
        print(f"annotating pods in {options.namespace}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    return 0
