"""What validation and execution share: the model, the store, the settings and the metrics, and
the resolution of tensors a request names (inline, or stored earlier)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooklab_proto import (
    BadElementError,
    ErrorCode,
    JsonTensor,
    MsgpackTensor,
    NumberArray,
    TensorRef,
    TensorValue,
    UnknownDtypeError,
    WireFormatError,
    inline_tensor,
)
from hooklab_server.engine import HookedTransformer

from ..auth import Account
from ..metrics import Metrics
from ..settings import Settings
from ..store import Store
from .errors import RequestError

if TYPE_CHECKING:  # callbacks imports ops: a type-only import breaks the cycle
    from ..callbacks import CallbackRelay


def decoded_tensor(
    value: NumberArray | JsonTensor | MsgpackTensor, what: str, ids: bool = False
) -> torch.Tensor:
    """An inline tensor's value (``ids``: the field holds token ids); 422 naming ``what`` when
    it is malformed."""
    try:
        return inline_tensor(value, ids)
    except WireFormatError as exc:
        code = (
            ErrorCode.BAD_DTYPE if isinstance(exc, UnknownDtypeError)
            else ErrorCode.BAD_VALUE if isinstance(exc, BadElementError)
            else ErrorCode.BAD_SHAPE
        )  # fmt: skip
        raise RequestError(code, f"bad tensor in {what}: {exc}") from None


@dataclass(eq=False)  # hashed by identity: one per server
class OpsContext:
    model: HookedTransformer
    store: Store
    settings: Settings
    metrics: Metrics
    caller: Account  # whose request this is: owns what it stores, sees only its own objects
    callbacks: CallbackRelay | None = None  # where client callbacks go (None: not served)

    def as_caller(self, caller: Account) -> OpsContext:
        return dataclasses.replace(self, caller=caller)

    def tensor(self, value: TensorValue, what: str, ids: bool = False) -> torch.Tensor:
        """The tensor a request field gives, inline or by reference; a plain array is float32,
        or int64 when ``ids`` (the field holds token ids) and its elements are integers."""
        if isinstance(value, TensorRef):
            stored = self.store.get("tensor", value.ref, self.caller).value
            assert isinstance(stored, torch.Tensor)
            return stored
        return decoded_tensor(value, what, ids)

    def finite_tensor(self, value: TensorValue, what: str) -> torch.Tensor:
        """A tensor that enters the computation: floating point values must be finite."""
        tensor = self.tensor(value, what)
        # float8 has no isfinite kernel: check those values widened.
        checked = tensor.float() if tensor.element_size() == 1 else tensor
        if tensor.is_floating_point() and not bool(checked.isfinite().all()):
            raise RequestError(
                ErrorCode.VALIDATION,
                f"{what} holds NaN or infinite values",
                "send finite numbers",
            )
        return tensor

    def cached_activation(self, cache_id: str, name: str) -> torch.Tensor:
        cache = self.store.get("cache", cache_id, self.caller).value
        assert isinstance(cache, dict)
        if name not in cache:
            raise RequestError(
                ErrorCode.NOT_FOUND, f"stored cache {cache_id!r} has no activation {name!r}"
            )
        return cache[name]
