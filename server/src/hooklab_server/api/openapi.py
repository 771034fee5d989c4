"""OpenAPI for routes that parse their own bodies (off the event loop): each declares its body
model with :func:`request_body`, and the schema gains the model, for JSON and msgpack alike."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hooklab_proto import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE

_REF = "#/components/schemas/{model}"
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``model`` (JSON or msgpack, same schema)."""
    _BODY_MODELS[model.__name__] = model
    schema = {"schema": {"$ref": _REF.format(model=model.__name__)}}
    return {
        "requestBody": {
            "required": True,
            "content": {JSON_MEDIA_TYPE: schema, MSGPACK_MEDIA_TYPE: schema},
        }
    }


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A reference to ``model``'s schema, which joins the components (e.g. for a response
    content type FastAPI does not describe itself, such as a stream's events)."""
    _BODY_MODELS[model.__name__] = model
    return {"schema": {"$ref": _REF.format(model=model.__name__)}}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        _, definitions = models_json_schema(
            [(model, "validation") for model in _BODY_MODELS.values()], ref_template=_REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in definitions.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema
