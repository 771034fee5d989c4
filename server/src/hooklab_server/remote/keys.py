"""Every Redis key the API and the workers share, named once (``P`` is the deployment's prefix):

    P:jobs:<model>       stream of jobs for the model; consumer group "workers"
    P:results:<job>      stream of the job's results (frames, steps, done, error); expires
    P:cancel:<job>       set when nobody waits for the job any more (value: the reason)
    P:tries:<job>        how many workers have started the job (a job that kills them stops)
    P:models             hash: model -> its registration (config, tokenizer files)
    P:workers:<model>    zset: worker id -> when its heartbeat runs out (Unix s)
    P:worker_metrics     hash: worker id -> its model and engine-side metrics (each heartbeat)

Stored objects and quotas have their own keys (``redis_store.py``, ``redis_quotas.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP = "workers"
# Every connection gives up rather than hang: a Redis that does not answer is a 503 at once,
# and no blocking read here waits longer than a second.
CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    def jobs(self, model: str) -> str:
        return f"{self.prefix}:jobs:{model}"

    def results(self, job_id: str) -> str:
        return f"{self.prefix}:results:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def tries(self, job_id: str) -> str:
        return f"{self.prefix}:tries:{job_id}"

    def callback_owner(self, session: str) -> str:
        return f"{self.prefix}:cb:{session}:owner"

    def callback_calls(self, session: str) -> str:
        return f"{self.prefix}:cb:{session}:calls"

    def callback_reply(self, call_id: str) -> str:
        return f"{self.prefix}:cb-reply:{call_id}"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    @property
    def worker_metrics(self) -> str:
        return f"{self.prefix}:worker_metrics"
