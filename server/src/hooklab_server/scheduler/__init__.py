"""The scheduler of a device: a fair queue across keys (``policy``) in front of one executor
thread that owns the model (``executor``)."""

from .executor import SchedulerExecutor
from .policy import FairQueue, Job, QueueFull

__all__ = ["FairQueue", "Job", "QueueFull", "SchedulerExecutor"]
