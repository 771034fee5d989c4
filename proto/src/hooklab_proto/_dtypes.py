"""Element types on the wire: safetensors' dtype codes and their torch equivalents."""

from __future__ import annotations

import torch

from .errors import UnknownDtypeError, WireFormatError

# One table serves both directions; the codes are safetensors' so any language can map them.
_CODE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in _CODE_TO_TORCH.items()}

DTYPE_CODES: tuple[str, ...] = tuple(_CODE_TO_TORCH)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a wire dtype code; raises WireFormatError for unknown codes."""
    try:
        return _CODE_TO_TORCH[code]
    except (KeyError, TypeError):
        raise UnknownDtypeError(
            f"unknown dtype {code!r}; expected one of {', '.join(DTYPE_CODES)}"
        ) from None


def dtype_code(dtype: torch.dtype) -> str:
    """The wire dtype code for a torch dtype; raises WireFormatError when it has none."""
    try:
        return _TORCH_TO_CODE[dtype]
    except KeyError:
        raise WireFormatError(f"torch dtype {dtype} has no wire dtype code") from None


def itemsize(code: str) -> int:
    return torch_dtype(code).itemsize


# A request's wire_dtype (``WireDtype``) -> what its floating-point tensors travel as.
WIRE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def for_the_wire(tensor: torch.Tensor, wire_dtype: str | None) -> torch.Tensor:
    """``tensor`` as it travels under a request's ``wire_dtype`` (floating point only)."""
    if wire_dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(WIRE_DTYPES[wire_dtype])
