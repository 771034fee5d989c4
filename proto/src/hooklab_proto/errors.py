"""Exceptions raised while encoding or decoding wire data."""

from __future__ import annotations


class WireFormatError(ValueError):
    """Bytes or JSON that do not follow the hooklab wire format.

    Every decoding failure — unknown dtype, a shape that disagrees with the byte count, an oversize
    or garbled frame, a frame that is not a map — raises this type, with a message saying what was
    expected.
    """


class UnknownDtypeError(WireFormatError):
    """A dtype code that is not one of the wire's."""


class BadElementError(WireFormatError):
    """An element its dtype cannot hold (1.5 as I64, 2 as BOOL, 1e40 as F16)."""


class TruncatedStreamError(WireFormatError):
    """A frame stream that stopped before its ``end`` or ``error`` frame."""
