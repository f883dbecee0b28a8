"""Configuration documents and environments for the scaler's tests."""

from __future__ import annotations

import copy
from typing import Any

BROKER_ENV = {
    "JOBTIDE_BROKER_HOST": "127.0.0.1",
    "JOBTIDE_BROKER_USERNAME": "scaler",
    "JOBTIDE_BROKER_PASSWORD": "s3cret-password",
}


def pipeline_document(queue: str, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "queue": queue,
        "jobTemplate": {
            "metadata": {"labels": {"team": "imaging"}, "annotations": {"owner": "ops"}},
            "spec": {
                "template": {
                    "metadata": {"labels": {"sidecar.istio.io/inject": "false"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "worker",
                                "image": "registry.example/resize:1",
                                "env": [{"name": "LOG_LEVEL", "value": "debug"}],
                            }
                        ],
                        "tolerations": [{"key": "batch", "operator": "Exists"}],
                    },
                }
            },
        },
    }
    doc.update(overrides)
    return doc


def config_document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "namespace": "jobs",
        "release": "rel",
        "pollIntervalSeconds": 1,
        # One worker per message keeps the expected Job counts easy to read.
        "pipelines": {"resize": pipeline_document("resize-q", messagesPerWorker=1)},
    }
    doc.update(copy.deepcopy(overrides))
    return doc
