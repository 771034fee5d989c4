"""What travels through Redis between the API and the workers: a job (the validated request as
the plain data it was parsed from, the caller, the deadline) and the entries of its results
stream. Everything is msgpack or proto tensor frames — never pickle; a worker validates a job's
request again, as the API did, before it runs anything.

Results stream entries carry a kind ``k`` and data ``d``:

    size     the result is ready: its frame stream is this many bytes (decimal)
    frames   a piece of the result's tensor frame stream (proto/README.md §1)
    end      the frame stream is complete
    step     a generation step (GenerateStep as JSON)
    done     a generation's response (GenerateResponse as JSON)
    error    the job failed: {code, message, hint, retry_after, quota}
    reset    the job started again on another worker: what came before is void
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from pydantic import BaseModel

from hooklab_proto import (
    AnalysisRequest,
    ErrorCode,
    ForwardRequest,
    GenerateRequest,
    IntegratedGradientsRequest,
    PatchingRequest,
    RunWithCacheRequest,
    RunWithHooksRequest,
)

from ..auth import Account
from ..ops import QuotaExceeded, RequestError, Work

# The operation a job runs -> the request it carries ("weight" carries {"name": …}).
REQUESTS: dict[str, type[BaseModel]] = {
    "forward": ForwardRequest,
    "run_with_cache": RunWithCacheRequest,
    "run_with_hooks": RunWithHooksRequest,
    "patching": PatchingRequest,
    "integrated_gradients": IntegratedGradientsRequest,
    "analysis": AnalysisRequest,
    "generate": GenerateRequest,
}
WEIGHT = "weight"


class Caller(msgspec.Struct, frozen=True):
    name: str
    admin: bool
    quotas: dict[str, int]

    @classmethod
    def of(cls, account: Account) -> Caller:
        return cls(account.name, account.admin, dict(account.quotas))

    def account(self) -> Account:
        return Account(self.name, admin=self.admin, quotas=dict(self.quotas))


class Job(msgspec.Struct, frozen=True):
    id: str
    op: str
    request: dict[str, Any]
    caller: Caller
    wants_json: bool
    deadline: float  # Unix time after which nobody waits for the result

    def remaining_s(self) -> float:
        return self.deadline - time.time()


_encoder = msgspec.msgpack.Encoder()
_job_decoder = msgspec.msgpack.Decoder(Job)


def job_for(work: Work, timeout_s: float) -> Job:
    """The job that runs ``work`` on a worker. The request goes as the plain data validation
    accepts (tensor maps keep their bytes), unset fields left out as the client left them."""
    request = work.request.model_dump(mode="python", exclude_unset=True)
    return Job(
        uuid.uuid4().hex, work.op, request, Caller.of(work.caller), work.wants_json,
        time.time() + timeout_s,
    )  # fmt: skip


def weight_job(name: str, caller: Account, wants_json: bool, timeout_s: float) -> Job:
    return Job(
        uuid.uuid4().hex, WEIGHT, {"name": name}, Caller.of(caller), wants_json,
        time.time() + timeout_s,
    )  # fmt: skip


def encode_job(job: Job) -> bytes:
    return _encoder.encode(job)


def decode_job(data: bytes) -> Job:
    return _job_decoder.decode(data)


# --- errors ---------------------------------------------------------------------------------


class _Error(msgspec.Struct):
    code: str
    message: str
    hint: str | None = None
    retry_after: float | None = None
    quota: str | None = None


_error_decoder = msgspec.msgpack.Decoder(_Error)


def encode_error(error: RequestError) -> bytes:
    quota = error.quota if isinstance(error, QuotaExceeded) else None
    return _encoder.encode(
        _Error(str(error.code), error.message, error.hint, error.retry_after, quota)
    )


def decode_error(data: bytes) -> RequestError:
    error = _error_decoder.decode(data)
    if error.quota is not None:
        return QuotaExceeded(error.quota, error.message, error.hint, error.retry_after)
    return RequestError(ErrorCode(error.code), error.message, error.hint, error.retry_after)
