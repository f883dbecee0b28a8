"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jobtide_testbed.rabbitmq import RabbitMQ
from workerbed import WorkerBed


@pytest.fixture
def bed(rabbitmq: RabbitMQ, tmp_path: Path) -> Iterator[WorkerBed]:
    bed = WorkerBed(rabbitmq, tmp_path)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture
def private_bed(
    rabbitmq_factory: Callable[..., RabbitMQ], tmp_path: Path
) -> Iterator[Callable[..., WorkerBed]]:
    """A WorkerBed on a private broker node (restart, kill, consumer timeout)."""
    beds: list[WorkerBed] = []

    def make(**broker_kwargs: Any) -> WorkerBed:
        bed = WorkerBed(rabbitmq_factory(**broker_kwargs), tmp_path)
        beds.append(bed)
        return bed

    try:
        yield make
    finally:
        for bed in beds:
            bed.close()
