"""The API side of a scaled-out deployment: the :class:`~hooklab_server.execution.Executor` that
queues each job on its model's Redis stream and reads its results stream back.

A job is abandoned (its cancel key set, so the worker stops at its next layer, step or chunk)
when the client leaves or the deadline passes. While it waits, the API checks that some worker of
the model is still alive; when none is, the request ends with 503 rather than waiting for a
deadline. A worker that dies mid-job is replaced by another that reclaims the job (worker.py);
a streaming generation that had already sent steps cannot be replayed and ends with a
retryable 503.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis

from hooklab_proto import ErrorCode, GenerateResponse, GenerateStep

from ..auth import Account
from ..ops import CancelToken, GenerateWork, RequestError, TensorWork
from ..redis_store import unavailable
from ..tensor_frames import StreamedTensors
from .jobs import Job, decode_error, encode_job, job_for, weight_job
from .keys import RedisKeys

READ_BLOCK_MS = 100  # how long one read waits: the latency of noticing a cancel
LIVENESS_EVERY_S = 1.0
CANCEL_KEY_TTL_S = 600
FINISH_TIMEOUT_S = 2.0


def worker_gone(model: str) -> RequestError:
    return RequestError(
        ErrorCode.UNAVAILABLE,
        f"no worker is running model {model!r} any more",
        "start a hooklab-worker for it, or retry once one is back",
        retry_after=5.0,
    )


class RemoteExecutor:
    """Runs one model's work on its workers, through Redis."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, model: str) -> None:
        self.redis, self.keys, self.model = client, keys, model

    # --- Executor ----------------------------------------------------------------------------

    async def run(self, work: TensorWork, token: CancelToken, key: str) -> StreamedTensors:
        return await self._tensors(job_for(work, token.remaining_s()), token)

    async def weight(
        self, name: str, caller: Account, wants_json: bool, token: CancelToken
    ) -> StreamedTensors:
        return await self._tensors(weight_job(name, caller, wants_json, token.remaining_s()), token)

    async def generate(
        self, work: GenerateWork, token: CancelToken, key: str
    ) -> AsyncGenerator[GenerateStep | GenerateResponse, None]:
        job = job_for(work, token.remaining_s())
        # Steps of a plain (not streamed) generation are held until it ends: if its worker
        # dies, the run that replaces it starts them afresh.
        streamed, held, sent = work.request.stream, list[GenerateStep](), 0
        # Closed explicitly: a client that leaves mid-stream stops the job now, not at GC.
        async with contextlib.aclosing(self._results(job, token)) as results:
            async for kind, data in results:
                if kind == "step" and streamed:
                    sent += 1
                    yield GenerateStep.model_validate_json(data)
                elif kind == "step":
                    held.append(GenerateStep.model_validate_json(data))
                elif kind == "done":
                    for step in held:
                        yield step
                    yield GenerateResponse.model_validate_json(data)
                    return
                elif kind == "reset":
                    held.clear()
                    if not sent:
                        continue
                    raise RequestError(
                        ErrorCode.UNAVAILABLE,
                        f"the worker running this generation stopped after {sent} steps; "
                        "another worker took the job over, but the steps already sent cannot "
                        "be replayed",
                        "send the request again",
                        retry_after=1.0,
                    )

    async def aclose(self) -> None:
        pass  # the client belongs to the model set

    # --- the job's round trip ----------------------------------------------------------------

    async def _tensors(self, job: Job, token: CancelToken) -> StreamedTensors:
        """Returns once the worker has the result and says how long its frame stream is; the
        frames follow as the response goes out (the transfers overlap)."""
        results = self._results(job, token)
        try:
            async for kind, data in results:
                if kind == "size":  # empty: the worker streams captures while it runs
                    return StreamedTensors(int(data) if data else None, self._frames(results))
        except BaseException:
            await results.aclose()
            raise
        raise AssertionError("a results stream ends with 'end' or 'error'")

    async def _frames(
        self, results: AsyncGenerator[tuple[str, bytes], None]
    ) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(results):
            async for kind, data in results:
                if kind == "frames":
                    yield data
                elif kind == "end":
                    return
                elif kind == "reset":  # the worker died while sending
                    raise RequestError(
                        ErrorCode.UNAVAILABLE,
                        "the worker sending this result stopped half-way",
                        "send the request again",
                        retry_after=1.0,
                    )

    async def _results(
        self, job: Job, token: CancelToken
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """The job's result entries as they come; 'error' entries raised. Stops the job on
        Redis when this generator is left early (the client left, the deadline passed)."""
        results = self.keys.results(job.id)
        finished = sending = False
        try:
            await self.redis.xadd(self.keys.jobs(self.model), {"job": encode_job(job)})
            last, checked = "0-0", time.monotonic()
            while True:
                if not sending:  # the deadline covers the work, not the transfer of its result
                    token.check()
                answer: Any = await self.redis.xread({results: last}, count=64, block=READ_BLOCK_MS)
                for _stream, entries in answer or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        kind, data = fields[b"k"].decode(), fields.get(b"d", b"")
                        if kind == "error":
                            finished = True
                            raise decode_error(data)
                        finished = kind in ("end", "done")
                        sending = sending or kind == "size"
                        yield kind, data
                        if finished:
                            return
                if time.monotonic() - checked > LIVENESS_EVERY_S:
                    checked = time.monotonic()
                    if not await self.live_workers():
                        raise worker_gone(self.model)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise unavailable(exc) from None
        finally:
            await self._finish(job, finished, token)

    async def _finish(self, job: Job, finished: bool, token: CancelToken) -> None:
        # Shielded: this runs as the request is being cancelled (the client left), which is
        # exactly when the worker must hear of it.
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_TIMEOUT_S):
            try:
                if not finished:  # nobody waits: the worker stops at its next check
                    reason = token.reason or "disconnect"
                    await self.redis.set(self.keys.cancel(job.id), reason, ex=CANCEL_KEY_TTL_S)
                await self.redis.delete(self.keys.results(job.id))
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # the results expire by themselves; the worker stops at the deadline

    async def live_workers(self) -> int:
        count: int = await self.redis.zcount(self.keys.workers(self.model), time.time(), "+inf")
        return count
