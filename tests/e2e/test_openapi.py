"""/openapi.json as the contract another language generates a client from: the exported copy
(proto/openapi.json) is what a real server serves, in both deployments; the document is usable
by generators (typed answers on every route, the error envelope on every error status, request
fields with defaults optional, dtypes as enums, no msgpack-only forms in JSON bodies); and real
answers follow it, checked by an independent JSON Schema validator (jsonschema_rs), with every
key they hold declared."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import BaseModel, RootModel

import hooklab_proto
from hooklab_proto import (
    DTYPE_CODES,
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_TOKEN,
    FRAMES_MEDIA_TYPE,
    IG_ATTRIBUTIONS,
    OUTPUT_LOGITS,
    OUTPUT_LOSS,
    OUTPUT_OBJECTIVE,
    OUTPUT_RESIDUAL,
    OUTPUT_VALUE,
    PATCHING_LOGITS,
    PATCHING_METRIC,
    ErrorCode,
)
from hooklab_server.api.errors import STATUS

from .e2e_servers import Served

EXPORTED = Path(__file__).resolve().parents[2] / "proto" / "openapi.json"
JSON = "application/json"
MSGPACK = "application/msgpack"
SSE = "text/event-stream"
PREFIX = "#/components/schemas/"
METHODS = ("get", "post", "put", "delete", "patch")

# The routes answering tensors, and the component each answers in JSON.
TENSOR_ROUTES = {
    "POST /v1/forward": "ForwardResult",
    "POST /v1/run_with_cache": "RunResult",
    "POST /v1/run_with_hooks": "RunResult",
    "POST /v1/patching": "PatchingResult",
    "POST /v1/integrated_gradients": "IntegratedGradientsResult",
    "POST /v1/analysis": "AnalysisResult",
    "GET /v1/weights/{name}": "NamedTensors",
    "GET /v1/tensors/{object_id}": "NamedTensors",
    "GET /v1/caches/{object_id}": "StoredCacheResult",
}


@pytest.fixture(scope="module")
def served(gpt2_server: Served) -> dict[str, Any]:
    response = httpx.get(f"{gpt2_server.url}/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield f"{method.upper()} {path}", item[method]


def component(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = document["components"]["schemas"][node["$ref"].removeprefix(PREFIX)]
    return node


def reachable(document: dict[str, Any], node: Any, seen: set[str] | None = None) -> set[str]:
    """The components ``node`` refers to, at any depth."""
    seen = set() if seen is None else seen
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.removeprefix(PREFIX) not in seen:
            name = ref.removeprefix(PREFIX)
            seen.add(name)
            reachable(document, document["components"]["schemas"][name], seen)
        for value in node.values():
            reachable(document, value, seen)
    elif isinstance(node, list):
        for value in node:
            reachable(document, value, seen)
    return seen


def object_schemas(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema with ``properties`` inside ``node``, with where it is."""
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            yield where, node
        for key, value in node.items():
            yield from object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from object_schemas(value, f"{where}[{index}]")


# ---- the exported document ----------------------------------------------------------------


def test_the_exported_document_is_what_the_server_serves(served: dict[str, Any]) -> None:
    exported = json.loads(EXPORTED.read_text(encoding="utf-8"))
    if exported != served:
        stale = sorted(
            f"{part}/{name}"
            for part in ("paths", "components")
            for name in set(exported.get(part, {})) | set(served.get(part, {}))
            if exported.get(part, {}).get(name) != served.get(part, {}).get(name)
        )
        pytest.fail(f"proto/openapi.json is out of date (run `make openapi`): {stale[:20]}")
    assert EXPORTED.read_text(encoding="utf-8") == (
        json.dumps(served, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    ), "proto/openapi.json is not in its stable form: sorted keys, two-space indents"


# ---- what a generator needs ------------------------------------------------------------------


def test_every_answer_has_a_schema(served: dict[str, Any]) -> None:
    for label, operation in operations(served):
        for status, response in operation["responses"].items():
            if status == "204":
                assert not response.get("content"), (label, status)
                continue
            content = response.get("content")
            assert content, f"{label} {status}: no content described"
            for media, entry in content.items():
                assert entry.get("schema"), f"{label} {status} {media}: empty schema"


def test_tensor_routes_answer_typed_json_or_frames(served: dict[str, Any]) -> None:
    tensor_routes = {
        label
        for label, operation in operations(served)
        if FRAMES_MEDIA_TYPE in operation["responses"].get("200", {}).get("content", {})
    }
    assert tensor_routes == set(TENSOR_ROUTES)
    for label, operation in operations(served):
        if label not in TENSOR_ROUTES:
            continue
        answer = operation["responses"]["200"]
        schema = answer["content"][JSON]["schema"]
        assert schema == {"$ref": PREFIX + TENSOR_ROUTES[label]}, label
        assert "tensors" in component(served, schema)["properties"], label
        assert answer["content"][FRAMES_MEDIA_TYPE]["schema"]["format"] == "binary", label
        # The frames media type is described, with where its format is written down.
        assert FRAMES_MEDIA_TYPE in answer["description"], label
        assert "proto/README.md" in answer["description"], label


def _tensor_names(served: dict[str, Any], result: str) -> set[str]:
    tensors = component(
        served, component(served, {"$ref": PREFIX + result})["properties"]["tensors"]
    )
    return set(tensors.get("properties", {}))


def _field_names(served: dict[str, Any], result: str) -> set[str]:
    return set(component(served, {"$ref": PREFIX + result})["properties"]) - {"tensors"}


def test_results_declare_what_the_server_sends(served: dict[str, Any]) -> None:
    outputs = {OUTPUT_LOGITS, OUTPUT_LOSS, OUTPUT_RESIDUAL, OUTPUT_VALUE, OUTPUT_OBJECTIVE}
    assert _tensor_names(served, "ForwardResult") == outputs
    assert _tensor_names(served, "RunResult") == outputs
    assert {"cache_id", "expires_at", "entries", "scheduler"} <= _field_names(served, "RunResult")
    assert _tensor_names(served, "PatchingResult") == {PATCHING_METRIC, PATCHING_LOGITS}
    patching_fields = {"shape", "axes", "rows", "forwards", "copies_per_forward", "baselines"}
    assert patching_fields <= _field_names(served, "PatchingResult")
    assert _tensor_names(served, "IntegratedGradientsResult") == {IG_ATTRIBUTIONS}
    ig_fields = {"value", "baseline_value", "convergence_delta", "steps", "forwards"}
    assert ig_fields <= _field_names(served, "IntegratedGradientsResult")
    scheduler = component(served, {"$ref": PREFIX + "SchedulerStats"})
    assert {"queued_s", "units_waited", "run_s", "units"} <= set(scheduler["required"])


def test_every_error_status_answers_the_envelope(served: dict[str, Any]) -> None:
    envelope = component(served, {"$ref": PREFIX + "ErrorResponse"})
    body = component(served, envelope["properties"]["error"])
    assert set(body["required"]) >= {"code", "message"}
    assert set(component(served, body["properties"]["code"])["enum"]) == {
        c.value for c in ErrorCode
    }
    for label, operation in operations(served):
        statuses = {int(s) for s in operation["responses"] if s[0] in "45"}
        # Any request may meet a wrong Host or a server bug; one with a body, any error code.
        everything = set(STATUS.values()) if "requestBody" in operation else {400, 500}
        assert statuses >= everything, (label, everything - statuses)
        for status in statuses:
            if (label, status) == ("GET /readyz", 503):
                continue  # readiness says why it is not ready, in its own body
            schema = operation["responses"][str(status)]["content"][JSON]["schema"]
            assert schema == {"$ref": PREFIX + "ErrorResponse"}, (label, status)


def test_generate_streams_its_events(served: dict[str, Any]) -> None:
    content = served["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    events = component(served, content[SSE]["schema"])
    mapping = events["discriminator"]["mapping"]
    assert set(mapping) == {EVENT_TOKEN, EVENT_DONE, EVENT_ERROR}
    data = {
        name: component(served, {"$ref": ref})["properties"]["data"]["$ref"].removeprefix(PREFIX)
        for name, ref in mapping.items()
    }
    assert data == {
        EVENT_TOKEN: "GenerateStep",
        EVENT_DONE: "GenerateResponse",
        EVENT_ERROR: "ErrorResponse",
    }


def test_no_field_with_a_default_is_required(served: dict[str, Any]) -> None:
    for where, schema in object_schemas(served["components"]):
        defaulted = {name for name, prop in schema["properties"].items() if "default" in prop}
        assert not defaulted & set(schema.get("required", [])), (where, defaulted)


def test_required_fields_are_the_models_required_fields(served: dict[str, Any]) -> None:
    """Independently of the schema's own ``default`` keys: what each proto model needs (a
    default_factory leaves no ``default`` in the schema) is exactly what the schema requires."""
    checked = 0
    for name, schema in served["components"]["schemas"].items():
        model = getattr(hooklab_proto, name.removesuffix("-Msgpack"), None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        if issubclass(model, RootModel):
            continue
        needed = {
            field.alias or field_name
            for field_name, field in model.model_fields.items()
            if field.is_required()
        }
        assert set(schema.get("required", [])) == needed, name
        checked += 1
    assert checked > 60


def test_every_dtype_is_an_enum_of_the_wire_codes(served: dict[str, Any]) -> None:
    found = 0
    for where, schema in object_schemas(served["components"]):
        if "dtype" not in schema["properties"]:
            continue
        dtype = schema["properties"]["dtype"]
        forms = [component(served, form) for form in dtype.get("anyOf", [dtype])]
        enums = [form for form in forms if form.get("type") != "null"]
        assert len(enums) == 1 and enums[0].get("enum") == list(DTYPE_CODES), where
        found += 1
    assert found >= 5


def test_json_bodies_offer_no_msgpack_only_forms(served: dict[str, Any]) -> None:
    """The msgpack tensor map (raw bytes) is the msgpack media type's alone; the JSON schema
    of a body never reaches it, nor any binary string."""
    tensor_bodies = 0
    for label, operation in operations(served):
        content = operation.get("requestBody", {}).get("content", {})
        if not content:
            continue
        as_json = reachable(served, content[JSON]["schema"])
        assert "MsgpackTensor" not in as_json, label
        assert '"format": "binary"' not in json.dumps(
            [served["components"]["schemas"][name] for name in as_json]
        ), label
        if "NumberArray" in as_json:  # a body with a tensor in it: msgpack may send the map
            tensor_bodies += 1
            assert "MsgpackTensor" in reachable(served, content[MSGPACK]["schema"]), label
    assert tensor_bodies >= 8


def test_one_component_per_model(served: dict[str, Any]) -> None:
    """No model split into validation and serialization variants (``-Input``/``-Output``)."""
    names = served["components"]["schemas"]
    assert not [name for name in names if name.endswith(("-Input", "-Output"))]


# ---- real answers follow the document --------------------------------------------------------


def _strict(document: dict[str, Any]) -> dict[str, Any]:
    """The components with every object closed to keys it does not declare."""
    components = copy.deepcopy(document["components"])
    for _, schema in object_schemas(components):
        schema.setdefault("additionalProperties", False)
    return components


class Answers:
    def __init__(self, document: dict[str, Any]) -> None:
        self.components = _strict(document)

    def check(self, instance: Any, name: str) -> None:
        schema = {"$ref": PREFIX + name, "components": self.components}
        errors = [
            f"{'/'.join(map(str, error.instance_path))}: {error.message[:300]}"
            for error in jsonschema_rs.Draft202012Validator(schema).iter_errors(instance)
        ]
        assert not errors, f"{name}: {errors[:5]}"


def _json(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(JSON)
    return response.json()


def test_tensor_answers_follow_their_schemas(served: dict[str, Any], http: httpx.Client) -> None:
    answers = Answers(served)
    tokens = [[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]
    metric = {"kind": "logit_diff", "answer": 3, "wrong": 4}
    answers.check(
        _json(http.post("/v1/forward", json={"input": tokens, "return_type": "both"})),
        "ForwardResult",
    )
    stored = _json(
        http.post(
            "/v1/run_with_cache",
            json={"input": tokens, "store": True, "return_cache": False},
        )
    )
    answers.check(stored, "RunResult")
    assert stored["entries"] and stored["cache_id"]
    with_grads = {"input": tokens, "names": ["hook_embed"], "incl_bwd": True, "return_type": "loss"}
    answers.check(_json(http.post("/v1/run_with_hooks", json=with_grads)), "RunResult")
    # Not the corrupted rows swapped: a batch-mean metric would be the same for both.
    clean = [[5, 6, 7, 8, 10], [9, 8, 7, 6, 4]]
    sweep = {"corrupted": tokens, "clean": clean, "activation": "resid_pre",
             "axes": ["layer", "pos"]}  # fmt: skip
    for extra in (
        {"metric": {**metric, "normalize": True}},
        {"metric": metric, "method": "attribution"},
        {"metric": {"kind": "logits", "positions": [4]}, "index": [[0, 1]]},
    ):
        answers.check(_json(http.post("/v1/patching", json={**sweep, **extra})), "PatchingResult")
    ig = {"input": tokens, "metric": metric, "steps": 4}
    answers.check(
        _json(http.post("/v1/integrated_gradients", json=ig)), "IntegratedGradientsResult"
    )
    analysis = {"cache": stored["cache_id"], "method": "accumulated_resid",
                "args": {"return_labels": True}}  # fmt: skip
    answers.check(_json(http.post("/v1/analysis", json=analysis)), "AnalysisResult")
    cache = _json(http.get(f"/v1/caches/{stored['cache_id']}", params={"names": "hook_embed"}))
    answers.check(cache, "StoredCacheResult")
    answers.check(_json(http.get("/v1/weights/W_E")), "NamedTensors")
    tensor = _json(http.post("/v1/tensors", json={"tensor": [1.5, -2.0]}), 201)
    answers.check(tensor, "StoredObject")
    answers.check(_json(http.get(f"/v1/tensors/{tensor['id']}")), "NamedTensors")
    answers.check(_json(http.get("/v1/tensors")), "StoredObjects")
    answers.check(_json(http.get("/v1/caches")), "StoredObjects")
    http.delete(f"/v1/tensors/{tensor['id']}")
    http.delete(f"/v1/caches/{stored['cache_id']}")


def test_other_answers_follow_their_schemas(served: dict[str, Any], http: httpx.Client) -> None:
    answers = Answers(served)
    for path, name in (
        ("/healthz", "Health"),
        ("/readyz", "Readiness"),
        ("/v1/capabilities", "Capabilities"),
        ("/v1/usage", "UsageResponse"),
        ("/v1/tokenizer", "TokenizerFiles"),
        ("/v1/model", "ModelInfo"),
        ("/v1/models", "ModelsResponse"),
    ):
        answers.check(_json(http.get(path)), name)
    body = {"input": [[5, 6, 7]], "hooks": [{"hook": "blocks.0.hook_nope", "op": "ablate"}]}
    answers.check(_json(http.post("/v1/forward", json=body), 422), "ErrorResponse")


def test_generate_events_follow_their_schema(served: dict[str, Any], http: httpx.Client) -> None:
    answers = Answers(served)
    body = {"input": [[5, 6, 7]], "max_new_tokens": 3, "do_sample": False, "stream": True}
    with http.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    names = []
    for block in events:
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        answers.check(
            {"event": fields["event"], "data": json.loads(fields["data"])}, "GenerateEvent"
        )
        names.append(fields["event"])
    assert names == [EVENT_TOKEN] * 3 + [EVENT_DONE]
    answers.check(
        _json(http.post("/v1/generate", json={**body, "stream": False})), "GenerateResponse"
    )
