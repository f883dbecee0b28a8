"""Fixtures of the scaler's integration tests (see scaler_bed.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jobtide_testbed.kube import KubeCluster
from jobtide_testbed.rabbitmq import RabbitMQ
from scaler_bed import ScalerBed, make_bed


@pytest.fixture
def bed(
    kube: KubeCluster,
    namespace: str,
    rabbitmq: RabbitMQ,
    tmp_path: Path,
) -> Iterator[ScalerBed]:
    scaler_bed = make_bed(kube, namespace, rabbitmq, tmp_path)
    try:
        yield scaler_bed
    finally:
        scaler_bed.stop_all()


@pytest.fixture
def private_bed(
    kube: KubeCluster, namespace: str, rabbitmq_factory: Callable[..., RabbitMQ], tmp_path: Path
) -> Iterator[ScalerBed]:
    """As `bed`, with a broker of its own that the test may stop and start."""
    scaler_bed = make_bed(kube, namespace, rabbitmq_factory(name="scaler"), tmp_path)
    try:
        yield scaler_bed
    finally:
        scaler_bed.stop_all()
