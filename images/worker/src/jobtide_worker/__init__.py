"""jobtide worker: run a handler for each task of a RabbitMQ queue, exit when idle.

from jobtide_worker import Task, PermanentError, run, publish, run_local
"""

from jobtide_worker.config import BrokerConfig, ConfigError, WorkerConfig
from jobtide_worker.local import run_local
from jobtide_worker.publisher import publish
from jobtide_worker.runner import run
from jobtide_worker.task import PermanentError, Task

__all__ = [
    "BrokerConfig",
    "ConfigError",
    "PermanentError",
    "Task",
    "WorkerConfig",
    "publish",
    "run",
    "run_local",
]
