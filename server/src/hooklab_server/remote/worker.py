"""``hooklab-worker``: one model on one device, running the jobs the API tier queues for it.

The worker reads its model's job stream as a member of the consumer group (so each job goes to
one worker), runs each job through the same scheduler an embedded server uses (fair queue,
merged forwards, continuous batching: up to ``worker_jobs`` at once), and writes the results to
the job's results stream. While a job runs the worker renews its claim every quarter lease;
a job whose claim ran out (its worker died) is reclaimed by another worker, which starts it
again (telling the API to drop what came before). A job that has stopped ``MAX_TRIES`` workers
is answered with an error instead of being tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from hooklab_proto import ErrorCode, GenerateResponse, stream_length

from ..api.bodies import validate_body
from ..auth import Account
from ..engine import HookedTransformer
from ..metrics import Metrics
from ..ops import (
    Cancelled,
    CancelToken,
    CaptureStream,
    GenerateWork,
    Operations,
    OpsContext,
    RequestError,
    TensorsResult,
    Work,
    deadline_error,
    objects,
)
from ..ops.describe import public_name, tokenizer_files
from ..redis_store import RedisStore
from ..scheduler import SchedulerExecutor
from ..settings import Settings
from ..tensor_frames import capture_frames, encode_frames, pieces_of, stream_pieces
from .callbacks import RedisCallbackRelay
from .jobs import REQUESTS, WEIGHT, Job, decode_job, encode_error
from .keys import CLIENT_OPTIONS, GROUP, RedisKeys
from .registry import Registration, beat, leave, register, worker_report

log = logging.getLogger("hooklab_server.worker")

MAX_TRIES = 3
PIECE_BYTES = 1 << 20  # the largest results entry (a tensor's payload is cut into these)
BATCH_BYTES = 2 << 20  # entries written at once: the API reads a batch while the next is sent
CANCEL_POLL_S = 0.05  # one MGET per poll while jobs run; a stop lands within a step or two
READ_BLOCK_MS = 500
STOP_GRACE_S = 30.0
BUSY_DELAY_S, BUSY_DELAY_MAX_S = 0.002, 0.02
FINAL = frozenset({"end", "done", "error"})
REPORT_EVERY_S = 0.2


class Worker:
    def __init__(self, model: HookedTransformer, settings: Settings) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self.sync = redis.Redis.from_url(settings.redis_url, **CLIENT_OPTIONS)
        self.redis = aioredis.Redis.from_url(settings.redis_url, **CLIENT_OPTIONS)
        store = RedisStore(
            self.sync, settings.max_stored_bytes, settings.store_ttl_s,
            settings.max_stored_objects, settings.redis_prefix,
        )  # fmt: skip
        self.metrics = metrics = Metrics()
        callbacks = RedisCallbackRelay(self.sync, self.keys)
        ctx = OpsContext(model, store, settings, metrics, Account("worker"), callbacks)
        self.operations = Operations(ctx)
        self.executor = SchedulerExecutor(self.operations, metrics, settings)
        model_name = str(model.cfg.model_name)
        self.model = public_name(model_name) or model_name
        self.registration = Registration(
            self.model, model.cfg.to_dict(), tokenizer_files(model), time.time()
        )
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.jobs_key = self.keys.jobs(self.model)
        self.running: dict[str, tuple[str, CancelToken]] = {}  # entry id -> (job id, token)
        self.tasks: set[asyncio.Task[None]] = set()
        self._reported = -REPORT_EVERY_S
        self.stopping = asyncio.Event()

    # --- the loops ---------------------------------------------------------------------------

    async def serve(self) -> None:
        await self._join_group()
        await asyncio.to_thread(register, self.sync, self.keys, self.registration)
        await self._beat()
        log.info("worker %s serves %s (%d jobs at once)", self.id, self.model, self._capacity)
        helpers = [
            asyncio.create_task(loop())
            for loop in (self._heartbeats, self._renew_and_reclaim, self._watch_cancels)
        ]
        try:
            while not self.stopping.is_set():
                if len(self.running) >= self._capacity:
                    await asyncio.sleep(0.01)
                    continue
                # One job at a time, a busy worker a little later than an idle one: jobs
                # spread over the workers (each its own device) rather than pile on one.
                if self.running:
                    await asyncio.sleep(min(BUSY_DELAY_MAX_S, BUSY_DELAY_S * len(self.running)))
                entries = await self._read(1)
                for entry_id, fields in entries:
                    self._start(entry_id, fields)
        finally:
            # Finish what was started (still beating, so the API keeps waiting for it); a job
            # cut off after the grace period is reclaimed by another worker.
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=STOP_GRACE_S)
            for helper in helpers:
                helper.cancel()
            await asyncio.to_thread(leave, self.sync, self.keys, self.model, self.id)
            await self.executor.aclose()
            await self.redis.aclose()
            self.sync.close()

    @property
    def _capacity(self) -> int:
        return self.settings.worker_jobs

    async def _join_group(self) -> None:
        try:  # from the stream's start: jobs queued before any worker are not lost
            await self.redis.xgroup_create(self.jobs_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            answer: Any = await self.redis.xreadgroup(
                GROUP, self.id, {self.jobs_key: ">"}, count=count, block=READ_BLOCK_MS
            )
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis does not answer (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1.0)
            return []
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the job stream is gone (Redis restarted empty?); joining it again")
            await self._join_group()
            return []
        return [entry for _stream, entries in answer or [] for entry in entries]

    async def _beat(self) -> None:
        lease, metrics = self.settings.worker_lease_s, self.metrics.engine_families()
        await asyncio.to_thread(
            beat, self.sync, self.keys, self.registration, self.id, lease, metrics
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_lease_s / 3)
            try:
                await self._beat()
            except (redis.ConnectionError, redis.TimeoutError):
                log.warning("heartbeat failed: Redis does not answer")

    async def _renew_and_reclaim(self) -> None:
        """Keep this worker's claims fresh; take over jobs whose claim ran out."""
        lease_ms = int(self.settings.worker_lease_s * 1000)
        while True:
            await asyncio.sleep(self.settings.worker_lease_s / 4)
            try:
                if self.running:
                    await self.redis.xclaim(
                        self.jobs_key, GROUP, self.id, 0, list(self.running), justid=True
                    )
                free = self._capacity - len(self.running)
                if free > 0 and not self.stopping.is_set():
                    answer = await self.redis.xautoclaim(
                        self.jobs_key, GROUP, self.id, lease_ms, "0-0", count=free
                    )
                    for entry_id, fields in answer[1]:
                        self._start(entry_id, fields or {})
            except (redis.ConnectionError, redis.TimeoutError):
                log.warning("claim renewal failed: Redis does not answer")

    async def _watch_cancels(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            if not self.running:
                continue
            running = list(self.running.values())
            try:
                reasons = await self.redis.mget([self.keys.cancel(job) for job, _ in running])
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            for (_job, token), reason in zip(running, reasons, strict=True):
                if reason is not None:
                    token.cancel("deadline" if reason == b"deadline" else "disconnect")

    # --- one job ------------------------------------------------------------------------------

    def _start(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        key = entry_id.decode()
        if key in self.running:
            return
        # A deleted entry (its job answered) comes back without fields, and one that is not a
        # job is dropped: each is acknowledged, nothing more.
        try:
            job = decode_job(fields[b"job"]) if b"job" in fields else None
        except msgspec.DecodeError:
            log.error("job entry %s is not a job; dropped", key)
            job = None
        token = CancelToken(job.remaining_s() if job else 0.0)
        self.running[key] = (job.id if job else "", token)  # counted now: reads stay in bounds
        task = asyncio.create_task(self._handle(key, job, token))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, entry_id: str, job: Job | None, token: CancelToken) -> None:
        try:
            if job is not None and await self._should_run(job):
                await self._run(job, token)
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("job %s: Redis does not answer; another worker will reclaim it", entry_id)
            return  # not acknowledged: reclaimed once Redis is back
        finally:
            self.running.pop(entry_id, None)
        await self._acknowledge(entry_id)

    async def _should_run(self, job: Job) -> bool:
        """False for a job nobody waits for; a reclaimed job is announced as restarted."""
        if job.remaining_s() <= 0:
            return False
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
            pipe.exists(self.keys.cancel(job.id))
            pipe.incr(self.keys.tries(job.id))
            pipe.expire(self.keys.tries(job.id), int(self.settings.result_ttl_s))
            cancelled, tries, _ = await pipe.execute()
        if cancelled:
            return False
        if tries > MAX_TRIES:
            error = RequestError(
                ErrorCode.INTERNAL,
                f"this job stopped {MAX_TRIES} workers running it; it is not tried again",
                "send less work in one request, or tell the operator",
            )
            await self._send(job, [("error", encode_error(error))])
            return False
        if tries > 1:
            log.info("job %s: taken over (try %d)", job.id, tries)
            await self._send(job, [("reset", b"")])
        return True

    async def _run(self, job: Job, token: CancelToken) -> None:
        caller = job.caller.account()
        try:
            if job.op == WEIGHT:
                name, ctx = job.request["name"], self.operations.ctx
                value = await asyncio.to_thread(objects.weight, ctx, name, job.wants_json)
                await self._send_tensors(job, TensorsResult({name: value}, {}))
                return
            work = await asyncio.to_thread(self._validate, job, caller)
            if isinstance(work, GenerateWork):
                async for item in self.executor.generate(work, token, caller.name):
                    kind = "done" if isinstance(item, GenerateResponse) else "step"
                    await self._send(job, [(kind, item.model_dump_json().encode())])
            else:
                result = await self.executor.run(work, token, caller.name)
                if isinstance(result, CaptureStream):
                    await self._send_streamed(job, result)
                else:
                    await self._send_tensors(job, result)
        except RequestError as error:
            await self._send(job, [("error", encode_error(error))])
        except Cancelled as stop:
            if stop.reason == "deadline":
                await self._send(job, [("error", encode_error(deadline_error(token)))])
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.op)
            failure = RequestError(ErrorCode.INTERNAL, f"the worker failed: {type(exc).__name__}")
            await self._send(job, [("error", encode_error(failure))])

    def _validate(self, job: Job, caller: Account) -> Work:
        body = validate_body(job.request, REQUESTS[job.op], self.settings)
        return self.operations.validate(body, caller, job.wants_json)

    async def _send_tensors(self, job: Job, result: TensorsResult) -> None:
        """The size first, then the frames a batch at a time: the API starts its response
        while the rest is still being written."""
        frames = await asyncio.to_thread(encode_frames, result.meta, result.tensors)
        size = str(stream_length(frames)).encode()
        entries: list[tuple[str, bytes | memoryview]] = [("size", size)]
        batch = 0
        for piece in stream_pieces(frames, PIECE_BYTES):
            entries.append(("frames", piece))
            batch += len(piece)
            if batch >= BATCH_BYTES:
                await self._send(job, entries)
                entries, batch = [], 0
        await self._send(job, [*entries, ("end", b"")])

    async def _send_streamed(self, job: Job, stream: CaptureStream) -> None:
        """A size not known yet, then each frame as the work makes it (a failure after the
        first is an error frame inside the stream)."""
        await self._send(job, [("size", b"")])
        async with contextlib.aclosing(capture_frames(stream, _error_fields)) as chunks:
            async for chunk in chunks:
                pieces = pieces_of(chunk, PIECE_BYTES)
                await self._send(job, [("frames", piece) for piece in pieces])
        await self._send(job, [("end", b"")])

    async def _send(self, job: Job, entries: list[tuple[str, bytes | memoryview]]) -> None:
        results = self.keys.results(job.id)
        async with self.redis.pipeline(transaction=False) as pipe:
            # The metrics count a job before the API hears of it (unless reported just now:
            # a report costs about half a millisecond; the heartbeat sends one anyway).
            if entries[-1][0] in FINAL and time.monotonic() - self._reported > REPORT_EVERY_S:
                self._reported = time.monotonic()
                report = worker_report(self.model, self.metrics.engine_families())
                pipe.hset(self.keys.worker_metrics, self.id, report)
            for kind, data in entries:
                pipe.xadd(results, {"k": kind, "d": data})
            pipe.expire(results, int(self.settings.result_ttl_s))
            await pipe.execute()

    async def _acknowledge(self, entry_id: str) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.jobs_key, GROUP, entry_id)
                pipe.xdel(self.jobs_key, entry_id)
                await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("job entry %s: could not acknowledge (Redis does not answer)", entry_id)


def _error_fields(error: RequestError) -> dict[str, Any]:
    return {"code": str(error.code), "message": error.message, "hint": error.hint}


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import configure_logging, load_configured_model
    from ..settings import build_parser, load_settings

    parser = build_parser(
        "hooklab-worker",
        "Run one model for a scaled-out hooklab: jobs come from Redis (--redis-url), queued by "
        "hooklab-server processes started with the same --redis-url.",
    )
    settings = load_settings(list(sys.argv[1:] if argv is None else argv), parser=parser)
    if not settings.redis_url:
        parser.error("a worker needs --redis-url (or HOOKLAB_REDIS_URL)")
    configure_logging()
    model = load_configured_model(settings, "hooklab-worker")
    if model is None:
        return 2
    worker = Worker(model, settings)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for stop in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop, worker.stopping.set)
        await worker.serve()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
