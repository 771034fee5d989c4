"""Tensors inside request bodies: a plain nested array, a JSON tensor, a msgpack tensor map, or a
stored-tensor ref."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    RootModel,
    SkipValidation,
    Tag,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

from ._base import Body
from ._dtypes import DTYPE_CODES, torch_dtype
from ._json import tensor_from_json
from ._tensor import MAX_NDIM
from .errors import WireFormatError

# The largest size of one axis; larger shapes (even with a zero elsewhere) are refused.
MAX_AXIS = 2**31 - 1
Shape = Annotated[list[Annotated[int, Field(ge=0, le=MAX_AXIS)]], Field(max_length=MAX_NDIM)]

# What a tensor field accepts, for messages: every form, with an example of each.
TENSOR_FORMS = (
    'a tensor is a nested array of numbers like [[0.1, 0.2]], {"dtype": "F32", "shape": [2], '
    '"data": [0.1, 0.2]}, or {"ref": "t_…"}'
)
TENSOR_FORM_ERROR = "tensor_form"

# A dtype code in a body. Described as an enum (one named component in /openapi.json, one type
# in a generated client); an unknown code is refused where the tensor is decoded, with the
# message (and error code) the decoder gives.
DtypeCode = TypeAliasType(
    "DtypeCode",
    Annotated[
        str,
        WithJsonSchema(
            {
                "type": "string",
                "enum": list(DTYPE_CODES),
                "description": "element type, safetensors' codes (proto/README.md §2)",
            }
        ),
    ],
)

# JSON has no literal for these floats; a JSON tensor spells them so.
NonFinite = Literal["NaN", "Infinity", "-Infinity"]
if TYPE_CHECKING:  # mypy does not follow recursive TypeAliasTypes; the values go unchecked
    TensorData = Any
    NestedNumbers = list[Any]
else:
    # A JSON tensor's elements: nested like its shape (or flat), or one number for a scalar.
    TensorData = TypeAliasType(
        "TensorData",
        Union[list["TensorData"], float, bool, NonFinite],  # noqa: UP007 (a forward reference)
    )
    # A plain array: numbers nested as deep as the tensor has axes.
    NestedNumbers = TypeAliasType(
        "NestedNumbers",
        list[Union[float, "NestedNumbers"]],  # Union: a forward reference cannot be |-ed
    )


class JsonTensor(Body):
    """``{"dtype", "shape", "data"}``: data nested like shape, or flat in C order."""

    dtype: DtypeCode
    shape: Shape
    # Checked against dtype and shape where the tensor is built (the walk is in _json.py).
    data: SkipValidation[TensorData]


class MsgpackTensor(BaseModel):
    """A tensor map inside a msgpack request body (proto/README.md §1)."""

    model_config = ConfigDict(strict=True)
    kind: Literal["tensor"]
    v: int = 1
    name: str = ""
    dtype: DtypeCode
    shape: Shape
    pad: bytes = b""
    data: bytes


class TensorRef(Body):
    """A tensor stored earlier with ``POST /v1/tensors``."""

    ref: str = Field(min_length=1, max_length=128)


class NumberArray(RootModel[SkipValidation[NestedNumbers]]):
    """A tensor as a plain nested array of numbers, e.g. ``[[0.1, 0.2], [0.3, 0.4]]``: its
    nesting is its shape; its elements are float32, or int64 when they are all integers in a
    field of token ids."""

    # Checked as the body is validated (rectangular, numbers only), so a bad one is refused
    # naming its field; built into a tensor where the field is used.
    model_config = ConfigDict(strict=True)
    _shape: list[int] = PrivateAttr(default_factory=list)
    _elements: list[float | int] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _rectangular(self) -> NumberArray:
        self._shape, self._elements = _shape_and_elements(self.root)
        return self

    @property
    def shape(self) -> list[int]:
        return list(self._shape)

    def tensor(self, ids: bool = False) -> torch.Tensor:
        """The array as a float32 tensor, or (``ids``: the field holds token ids) an int64 one
        when every element is an integer; one with a fraction stays float32, for the field to
        refuse. Raises WireFormatError for an integer past int64."""
        integers = ids and all(type(x) is int for x in self._elements)
        try:
            # Python floats are doubles: built in float64, rounded once to float32.
            values = torch.tensor(self._elements, dtype=torch.int64 if integers else torch.float64)
        except (RuntimeError, OverflowError) as exc:
            raise WireFormatError(
                f"the array does not fit {'I64' if integers else 'F32'}: {exc}"
            ) from None
        return (values if integers else values.float()).reshape(self._shape)


def _shape_and_elements(data: list[Any]) -> tuple[list[int], list[float | int]]:
    """The shape of a rectangular nested list of numbers and its elements in C order; a
    PydanticCustomError naming the accepted forms for anything else."""
    shape: list[int] = []
    node: Any = data
    while isinstance(node, list):  # the first elements say the shape; the walk checks the rest
        shape.append(len(node))
        node = node[0] if node else None
        if len(shape) > MAX_NDIM:
            raise _refused(f"the array is nested past {MAX_NDIM} axes")
    elements: list[float | int] = []

    def walk(node: Any, depth: int, at: str) -> None:
        if not isinstance(node, list) or len(node) != shape[depth]:
            found = f"has length {len(node)}" if isinstance(node, list) else f"is {_short(node)}"
            raise _refused(
                f"the array is ragged: {at} {found} where the first list at its depth has "
                f"length {shape[depth]}"
            )
        if depth < len(shape) - 1:
            for index, item in enumerate(node):
                walk(item, depth + 1, f"{at}[{index}]")
            return
        # A row of numbers: checked by type (bool is an int subclass, and not a number here).
        if not all(type(item) is float or type(item) is int for item in node):
            index, item = next(
                (i, x) for i, x in enumerate(node) if type(x) is not float and type(x) is not int
            )
            what = "a list where a number is expected" if isinstance(item, list) else "not a number"
            raise _refused(f"{at}[{index}] is {_short(item)}, {what}")
        elements.extend(node)

    walk(data, 0, "array")
    return shape, elements


def _short(value: Any) -> str:
    said = repr(value)
    return said if len(said) <= 40 else said[:37] + "..."


def _refused(problem: str) -> PydanticCustomError:
    # A custom error keeps pydantic from prefixing "Value error, ".
    return PydanticCustomError(TENSOR_FORM_ERROR, f"{problem}; {TENSOR_FORMS}")


def _tensor_form(value: Any) -> str | None:
    """Which form a tensor value takes: a plain array, a stored ref, a msgpack tensor map, or
    a JSON tensor; None (refused, naming the forms) for anything else."""
    if isinstance(value, list | NumberArray):
        return "array"
    if isinstance(value, dict):
        return "ref" if "ref" in value else "msgpack" if "kind" in value else "json"
    if isinstance(value, TensorRef):
        return "ref"
    if isinstance(value, MsgpackTensor):
        return "msgpack"
    return "json" if isinstance(value, JsonTensor) else None


# Dispatching on the form makes errors name the one form meant, not all of them.
_FORMS = Discriminator(
    _tensor_form, custom_error_type=TENSOR_FORM_ERROR, custom_error_message=TENSOR_FORMS
)
# "tensor" labels the form in error locations inside other unions (``float | TensorValue``).
InlineTensor = Annotated[
    Annotated[NumberArray, Tag("array")]
    | Annotated[MsgpackTensor, Tag("msgpack")]
    | Annotated[JsonTensor, Tag("json")],
    _FORMS,
    Tag("tensor"),
]
TensorValue = Annotated[
    Annotated[NumberArray, Tag("array")]
    | Annotated[TensorRef, Tag("ref")]
    | Annotated[MsgpackTensor, Tag("msgpack")]
    | Annotated[JsonTensor, Tag("json")],
    _FORMS,
    Tag("tensor"),
]


def inline_tensor(
    value: NumberArray | JsonTensor | MsgpackTensor, ids: bool = False
) -> torch.Tensor:
    """The torch tensor an inline value describes (a plain array of integers as int64 in a field
    of token ids, ``ids``; else float32); raises WireFormatError when malformed."""
    if isinstance(value, NumberArray):
        return value.tensor(ids)
    if isinstance(value, JsonTensor):
        # Not model_dump: data is checked by the walk in _json.py, not by a serializer.
        return tensor_from_json({"dtype": value.dtype, "shape": value.shape, "data": value.data})
    if value.v != 1:
        raise WireFormatError(f"tensor version {value.v} is not supported; expected 1")
    dtype = torch_dtype(value.dtype)
    if any(size < 0 for size in value.shape):
        raise WireFormatError(f"shape {value.shape} has a negative size")
    expected = dtype.itemsize
    for size in value.shape:
        expected *= size
    if expected != len(value.data):
        raise WireFormatError(
            f"shape {value.shape} of {value.dtype} needs {expected} bytes, got {len(value.data)}"
        )
    if expected == 0:
        return torch.empty(value.shape, dtype=dtype)
    return torch.frombuffer(bytearray(value.data), dtype=dtype).reshape(value.shape)
