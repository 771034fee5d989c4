"""/openapi.json: the contract other languages generate clients from.

Routes parse their own bodies (off the event loop), so each declares its body model with
:func:`request_body` and its answers with :func:`tensor_responses`, :func:`schema_of` and
:func:`error_responses`; the schema gains those models here. Request bodies are described in
pydantic's validation mode (a field with a default is not required), responses in its
serialization mode. The JSON media type's schemas leave out the msgpack-only tensor map
(``MsgpackTensor``: raw bytes JSON cannot carry); the msgpack media type refers to
``<Model>-Msgpack`` variants that keep it, made for every component that reaches it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from hooklab_proto import (
    FRAMES_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    ErrorResponse,
    MsgpackTensor,
)

from .errors import STATUS

_PREFIX = "#/components/schemas/"
_REF = _PREFIX + "{model}"
MSGPACK_VARIANT = "{model}-Msgpack"
WIRE_FORMAT = "proto/README.md"  # in the hooklab repository: the normative wire format

# Each model whose schema joins the components, and the mode it is described in.
_MODELS: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {}

DESCRIPTION = f"""TransformerLens-style operations over HTTP.

Request bodies are JSON (`{JSON_MEDIA_TYPE}`) or msgpack (`{MSGPACK_MEDIA_TYPE}`), same schema;
in msgpack a tensor may also be a tensor map with raw bytes (`MsgpackTensor`). A tensor in a
body is a plain nested array of numbers (`[[0.1, 0.2]]`: float32, or integers for token ids),
a JSON tensor `{{"dtype", "shape", "data"}}`, or a stored tensor `{{"ref": id}}`.

Tensor routes answer JSON, `{{"tensors": {{name: {{"dtype", "shape", "data"}}}}, ...fields}}`,
unless the `Accept` header names `{FRAMES_MEDIA_TYPE}`: then a frame stream
(`[u32 little-endian length][msgpack map]`, repeated: begin, one frame per tensor with its raw
little-endian bytes, end or error), whose begin frame (or end frame, for a stream sent while
the work runs) carries the same fields. The wire format: [{WIRE_FORMAT}]({WIRE_FORMAT}).

Every error is `{{"error": {{"code", "message", "hint", "request_id"}}}}` with the status its
code maps to; a failure after a stream started is its last frame or event."""

FRAMES_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": f"a hooklab frame stream; the format: {WIRE_FORMAT} §3-4",
}


def _register(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
    _MODELS[model.__name__] = (model, mode)
    return {"$ref": _REF.format(model=model.__name__)}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``model`` (JSON or msgpack)."""
    ref = _register(model, "validation")
    return {
        "requestBody": {
            "required": True,
            "content": {JSON_MEDIA_TYPE: {"schema": ref}, MSGPACK_MEDIA_TYPE: {"schema": ref}},
        }
    }


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A media type's entry for a response that is ``model`` (it joins the components)."""
    return {"schema": _register(model, "serialization")}


def tensor_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route answering tensors: ``model`` in JSON, or a frame stream."""
    return {
        200: {
            "description": f"JSON by default (`{model.__name__}`); a frame stream when `Accept` "
            f"names `{FRAMES_MEDIA_TYPE}` (the same tensors, one frame each, and the same "
            f"fields in its begin frame; the format: [{WIRE_FORMAT}]({WIRE_FORMAT}) §3-4)",
            "content": {
                JSON_MEDIA_TYPE: schema_of(model),
                FRAMES_MEDIA_TYPE: {"schema": FRAMES_SCHEMA},
            },
        }
    }


def error_responses(*only: int) -> dict[int | str, dict[str, Any]]:
    """The error envelope under every status an error code maps to (or those of ``only``),
    naming those codes."""
    codes: dict[int, list[str]] = defaultdict(list)
    for code, status in STATUS.items():
        if not only or status in only:
            codes[status].append(str(code))
    return {
        status: {
            "description": f"error code {' | '.join(names)}",
            "content": {JSON_MEDIA_TYPE: schema_of(ErrorResponse)},
        }
        for status, names in sorted(codes.items())
    }


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=DESCRIPTION,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        json_forms, msgpack_forms = _media_variants(_definitions())
        # Over FastAPI's descriptions of the same models (it leaves out null defaults).
        components.update({**json_forms, **msgpack_forms})
        mixed = [name for name in components if name.endswith(("-Input", "-Output"))]
        if mixed:  # FastAPI's split of a model used both ways: one component each, please
            raise RuntimeError(f"components with mode variants in /openapi.json: {mixed}")
        _msgpack_bodies(schema, {name for name in json_forms if name in _variants(msgpack_forms)})
        app.openapi_schema = schema
    return app.openapi_schema


def _definitions() -> dict[str, Any]:
    """The components of the registered models: requests in validation mode, responses in
    serialization mode. A model reached both ways must read the same both ways (one
    component, not pydantic's ``-Input``/``-Output`` pair)."""
    found: dict[str, Any] = {}
    for mode in ("validation", "serialization"):
        models = [(model, mode) for model, wanted in _MODELS.values() if wanted == mode]
        _, definitions = models_json_schema(models, ref_template=_REF)
        for name, definition in definitions.get("$defs", {}).items():
            if found.setdefault(name, definition) != definition:
                raise RuntimeError(f"{name} reads differently in requests and responses")
    return found


# --- the JSON and msgpack forms of request components ------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    """The component names ``node`` refers to."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PREFIX):
            yield ref.removeprefix(_PREFIX)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _without(node: Any, name: str) -> Any:
    """``node`` with every union branch that is a reference to ``name`` left out."""
    ref = _REF.format(model=name)
    if isinstance(node, dict):
        return {
            key: [_without(item, name) for item in value if item != {"$ref": ref}]
            if key in ("oneOf", "anyOf") and isinstance(value, list)
            else _without(value, name)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_without(item, name) for item in node]
    return node


def _retargeted(node: Any, names: set[str]) -> Any:
    """``node`` with references to ``names`` pointing at their msgpack variants."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.removeprefix(_PREFIX) in names:
            variant = MSGPACK_VARIANT.format(model=ref.removeprefix(_PREFIX))
            return {**node, "$ref": _REF.format(model=variant)}
        return {key: _retargeted(value, names) for key, value in node.items()}
    if isinstance(node, list):
        return [_retargeted(item, names) for item in node]
    return node


def _media_variants(
    definitions: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The components for JSON (no msgpack tensor map) and the msgpack variants of those that
    reach it (``MsgpackTensor`` itself among them, under its own name)."""
    tensor_map = MsgpackTensor.__name__
    reaching = {tensor_map}
    while True:  # everything that refers, at any depth, to the tensor map
        more = {name for name, node in definitions.items() if reaching & set(_refs(node))}
        if more <= reaching:
            break
        reaching |= more
    json_forms = {
        name: _without(copy.deepcopy(node), tensor_map)
        for name, node in definitions.items()
        if name != tensor_map
    }
    variants = reaching - {tensor_map}
    msgpack_forms: dict[str, Any] = {
        MSGPACK_VARIANT.format(model=name): _retargeted(definitions[name], variants)
        for name in sorted(variants)
    }
    if tensor_map in definitions:
        msgpack_forms[tensor_map] = definitions[tensor_map]
    return json_forms, msgpack_forms


def _variants(msgpack_forms: Iterable[str]) -> set[str]:
    suffix = MSGPACK_VARIANT.format(model="")
    return {name.removesuffix(suffix) for name in msgpack_forms if name.endswith(suffix)}


def _msgpack_bodies(schema: dict[str, Any], variants: set[str]) -> None:
    """Point each msgpack request body at its model's msgpack variant (when it has one)."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            body = operation.get("requestBody", {}).get("content", {})
            entry = body.get(MSGPACK_MEDIA_TYPE)
            if entry is None:
                continue
            name = entry["schema"]["$ref"].removeprefix(_PREFIX)
            if name in variants:
                body[MSGPACK_MEDIA_TYPE] = {
                    "schema": {"$ref": _REF.format(model=MSGPACK_VARIANT.format(model=name))}
                }
