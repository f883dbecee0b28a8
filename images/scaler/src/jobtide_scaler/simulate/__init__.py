"""A discrete-event simulator of a queue, a scaler and worker pods.

It replays jobtide's own policy (`jobtide_scaler.policy`, imported, never copied) against KEDA
ScaledJob, the HPA and the pattern's original demo on the same workloads and settings, so that
users can tune their thresholds on their own traces before deploying (docs/simulator.md).
"""

from jobtide_scaler.simulate.engine import Metrics, Settings, SimulationResult, simulate
from jobtide_scaler.simulate.workloads import Task, Workload

__all__ = ["Metrics", "Settings", "SimulationResult", "Task", "Workload", "simulate"]
