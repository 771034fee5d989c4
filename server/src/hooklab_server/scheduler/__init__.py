"""The scheduler of a device: a fair queue across keys (``policy``) in front of one executor
thread that owns the model (``executor``). The thread runs units alone, merges forwards
(``forward_batches``) and decodes generations together (``decoding``); ``ledger`` keeps the books
both threads share, ``runs`` the record of each job."""

from .executor import SchedulerExecutor
from .policy import FairQueue, Job, QueueFull

__all__ = ["FairQueue", "Job", "QueueFull", "SchedulerExecutor"]
