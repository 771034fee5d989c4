"""Request and response bodies of the HTTP API (JSON or msgpack, same schema)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from ._base import Body
from ._forms import one_of
from ._graph import Graph
from ._limits import bounded_ids, bounded_length
from ._metrics import PatchMetric
from ._saes import SaeIds
from ._specs import HookSpec
from ._tensor_values import DtypeCode, InlineTensor, TensorValue

JSON_MEDIA_TYPE = "application/json"
MSGPACK_MEDIA_TYPE = "application/msgpack"
FRAMES_MEDIA_TYPE = "application/vnd.hooklab.frames+msgpack"

# Names of the non-activation tensors in a response stream or JSON body.
OUTPUT_LOGITS = "output.logits"
OUTPUT_LOSS = "output.loss"
OUTPUT_VALUE = "output.value"  # a logits_graph's result
OUTPUT_RESIDUAL = "output.residual"
OUTPUT_OBJECTIVE = "output.objective"  # the scalar a backward pass started from
GRAD_SUFFIX = "_grad"  # a gradient's name: its hook point's plus this (TransformerLens's keys)
# A cached point sent in the sparse top-k form travels as two tensors: its name plus these.
TOP_K_INDICES_SUFFIX = ".top_k_indices"  # I32, the last axis's indices [..., k]
TOP_K_VALUES_SUFFIX = ".top_k_values"  # the activation's dtype (or wire_dtype) [..., k]
# The points sparse_top_k applies to when it names none: an attached SAE's feature activations.
SAE_FEATURE_POINTS = (".hook_sae_acts_pre", ".hook_sae_acts_post")

WireDtype = Literal["float16", "bfloat16"]  # what floating-point tensors may travel as
TokenInput = Annotated[
    str | list[str] | list[int] | list[list[int]] | TensorValue,
    bounded_ids("max_tokens"),
    one_of('text ("Hello"), a list of texts, or token ids ([[464, 2068]], or a tensor)'),
]
TokenIds = Annotated[
    list[list[int]] | TensorValue,
    bounded_ids("max_tokens"),
    one_of("token ids [batch, pos] ([[464, 2068]], or a tensor)"),
]
HookSpecs = Annotated[list[HookSpec], bounded_length("max_specs", "hook specs")]
HookNames = Annotated[list[str], bounded_length("max_names", "hook names")]


class ErrorCode(StrEnum):
    """Machine-readable error codes; each maps to one HTTP status (the server's api/errors.py)."""

    BAD_REQUEST = "bad_request"  # malformed body
    BAD_HOST = "bad_host"  # a Host header the server does not answer to
    VALIDATION = "validation_error"  # well-formed but a field is invalid
    UNKNOWN_HOOK = "unknown_hook"
    BAD_INDEX = "bad_index"
    BAD_SHAPE = "bad_shape"  # a tensor's shape or byte count does not fit
    BAD_DTYPE = "bad_dtype"  # a dtype code that is not one of the wire's
    BAD_VALUE = "bad_value"  # an element its dtype cannot hold (1.5 as I64)
    CONFLICT = "conflicting_specs"
    TOO_LARGE = "too_large"  # over a size limit: body, tokens, specs, rows, response …
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"  # no key, or not a key of this server
    QUOTA = "quota"  # over one of the key's quotas
    QUEUE_FULL = "queue_full"  # too much work waiting (the key's, or everyone's)
    METHOD_NOT_ALLOWED = "method_not_allowed"
    STORE_FULL = "store_full"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TIMEOUT = "request_timeout"  # the body did not arrive in time
    DEADLINE = "deadline_exceeded"  # the work passed the request's timeout_s
    UNAVAILABLE = "unavailable"  # a part the server needs (Redis, a model's workers) is down
    CALLBACK_FAILED = "callback_failed"  # a client callback raised, timed out or disconnected
    INTERNAL = "internal"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    hint: str | None = None
    request_id: str | None = Field(None, description="also in the x-request-id header and logs")


class ErrorResponse(BaseModel):
    error: ErrorBody


ModelName = Annotated[
    str | None,
    Field(
        max_length=256,
        description="which served model (GET /v1/models); default: the only, or first, one",
    ),
]
Timeout = Annotated[
    float | None,
    Field(gt=0, description="seconds this request may run; capped by the server (limits)"),
]


class ForwardRequest(Body):
    """TransformerLens ``forward`` arguments, plus hook specs active during this call."""

    model: ModelName = None
    input: TokenInput | None = Field(None, description="text, texts, or token ids [batch, pos]")
    residual: TensorValue | None = Field(
        None, description="residual stream [batch, pos, d_model] to start from (start_at_layer)"
    )
    tokens: TokenIds | None = Field(
        None, description="token ids for the loss when starting from a residual"
    )
    return_type: Literal["logits", "loss", "both"] | None = Field(
        "logits",
        description="TransformerLens's: 'logits' [batch, pos, d_vocab] (output.logits), 'loss' "
        "(output.loss), 'both', or null for neither (e.g. a cache alone). The logits of even "
        "a short prompt are large (d_vocab floats per token): ask for what you read",
    )
    outputs: list[Literal["logits", "loss"]] | None = Field(
        None,
        max_length=2,
        description="the outputs wanted, as a list ([] none, ['loss'], ['logits', 'loss']): "
        "another way to say return_type; give one or the other",
    )
    loss_per_token: bool = False
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None
    attention_mask: TokenIds | None = None
    start_at_layer: int | None = None
    stop_at_layer: int | None = None
    hooks: HookSpecs = Field(default_factory=list)
    logits_graph: Graph | None = Field(
        None,
        description="a traced function of the logits (e.g. the client's metric): its value comes "
        "back as output.value instead of the logits (return_type 'logits' only)",
    )
    objective: PatchMetric | None = Field(
        None,
        description="the scalar a backward pass starts from (gradients on activations only), "
        "one of the metric kinds except 'logits'; null with incl_bwd or bwd_hooks: the loss "
        "(return_type 'loss', as TransformerLens's out.backward()). Its value comes back as "
        "output.objective",
    )
    bwd_hooks: HookSpecs = Field(
        default_factory=list,
        description="hook specs run on the gradient at their hook point during the backward "
        "pass (e.g. scale or zero it); what they return flows upstream",
    )
    wire_dtype: WireDtype | None = Field(
        None,
        description="send floating-point tensors in this dtype (half the bytes of float32): "
        "float16 rounds to 11 significant bits and turns magnitudes above 65504 into inf; "
        "bfloat16 rounds to 8 bits and keeps float32's range. Null: as computed",
    )
    saes: SaeIds = Field(default_factory=list)
    timeout_s: Timeout = None

    @model_validator(mode="after")
    def _outputs_as_return_type(self) -> ForwardRequest:
        """``outputs`` said as ``return_type`` (what the rest reads); ``outputs`` is then
        cleared, so the request re-validates the same (a worker validates it again)."""
        if self.outputs is None:
            return self
        if "return_type" in self.model_fields_set:
            raise PydanticCustomError("conflict", "give 'outputs' or 'return_type', not both")
        wanted = set(self.outputs)
        self.return_type = (
            "both" if wanted == {"logits", "loss"} else "logits" if "logits" in wanted
            else "loss" if wanted else None
        )  # fmt: skip
        self.outputs = None
        return self

    @property
    def wants_gradients(self) -> bool:
        """A backward pass runs: an objective, backward hooks, or (a cache's) incl_bwd."""
        incl_bwd = bool(getattr(self, "incl_bwd", False))
        return self.objective is not None or bool(self.bwd_hooks) or incl_bwd


class SparseTopK(Body):
    """The sparse top-k form of cached activations: per position, the k largest entries of the
    last axis (an SAE's features) as indices and values instead of the dense tensor."""

    k: int = Field(ge=1, description="entries kept per position; at most the last axis's size")
    names: HookNames | None = Field(
        None,
        description="cached hook names or globs sent in this form; null: every cached SAE "
        "feature activation ('*.hook_sae_acts_pre', '*.hook_sae_acts_post')",
    )


class RunWithCacheRequest(ForwardRequest):
    """``run_with_cache``: the forward plus the activations at ``names``."""

    names: HookNames | None = Field(
        None, description="hook names or globs to cache; null caches every hook point that fires"
    )
    remove_batch_dim: bool = False
    store: bool = Field(False, description="keep the cache on the server and return its id")
    return_cache: bool = Field(True, description="send the activations back")
    lazy: bool = Field(
        False,
        description="keep the activations and the logits (or residual) on the server: a stored "
        "cache whose index (each entry's shape and dtype) comes back in the begin frame as "
        "'entries', read later with GET /v1/caches/{id}?names=…; output.loss and "
        "output.objective still come back",
    )
    incl_bwd: bool = Field(
        False,
        description="also backpropagate (from 'objective', or the loss) and return "
        "'{name}_grad' for every name cached",
    )
    sparse_top_k: SparseTopK | None = Field(
        None,
        description="send these cached activations as their top k along the last axis "
        "(torch.topk's order): '{name}.top_k_indices' (I32) and '{name}.top_k_values' "
        "[..., k] instead of '{name}'. Not with lazy; gradients stay dense",
    )


class RunWithHooksRequest(RunWithCacheRequest):
    """``run_with_hooks``: a forward with hook specs; caches nothing unless ``names`` is given."""

    names: HookNames | None = Field(
        default_factory=list,
        description="hook names or globs ('blocks.*.hook_resid_post') whose activations come "
        "back too; null: every hook point that fires",
    )


class TokenizeRequest(Body):
    model: ModelName = None
    input: Annotated[str | list[str], bounded_length("max_batch", "texts")]
    prepend_bos: bool | None = None
    padding_side: Literal["left", "right"] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[list[int]]
    attention_mask: list[list[int]]
    str_tokens: list[list[str]]


class DetokenizeRequest(Body):
    model: ModelName = None
    tokens: Annotated[
        list[int] | list[list[int]],
        bounded_ids("max_tokens"),
        one_of("token ids: a list ([464, 2068]) or a list of lists ([[464], [2068]])"),
    ]


class DetokenizeResponse(BaseModel):
    text: str | list[str]


class StoreTensorRequest(Body):
    tensor: InlineTensor
    ttl_s: float | None = Field(None, gt=0, description="seconds to keep it (capped by the server)")


class StoredObject(BaseModel):
    id: str
    kind: Literal["tensor", "cache"]
    nbytes: int
    expires_at: float = Field(description="Unix time after which the object is gone")
    dtype: DtypeCode | None = Field(None, description="a tensor's wire dtype code (F32, I64, …)")
    shape: list[int] | None = None
    names: list[str] | None = None
    owner: str = Field(description="the name of the key that stored it")


class StoredObjects(BaseModel):
    objects: list[StoredObject]


QuotaName = Literal[
    "concurrent_requests", "tokens_per_minute", "stored_bytes", "max_new_tokens",
    "max_patching_forwards",
]  # fmt: skip


class KeyUsage(BaseModel):
    key: str = Field(description="the key's name")
    admin: bool
    usage: dict[str, int] = Field(
        description="concurrent_requests, tokens_last_minute, stored_bytes now"
    )
    limits: dict[str, int] = Field(description="the key's quotas")


class UsageResponse(KeyUsage):
    keys: list[KeyUsage] | None = Field(None, description="every key (admins only)")


class HookPointInfo(BaseModel):
    name: str
    shape: list[str | int] = Field(description="symbolic shape, e.g. ['batch', 'pos', 'd_model']")
    fires_by_default: bool


class TokenizerInfo(BaseModel):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    padding_side: str
    prepends_bos: bool
    files: list[str]


class Limits(BaseModel):
    """The server's limits (its settings of the same names)."""

    max_request_bytes: int
    max_request_items: int
    max_text_chars: int
    max_tokens: int
    max_batch: int
    max_specs: int
    max_selector_length: int
    max_names: int
    max_hook_applications: int
    max_patching_rows: int
    max_patching_forwards: int
    patching_budget_bytes: int
    max_response_bytes: int
    max_json_response_bytes: int
    request_timeout_s: float
    max_timeout_s: float
    max_stored_bytes: int
    max_stored_objects: int
    max_sae_bytes: int | None = None
    store_ttl_s: float


class ModelInfo(BaseModel):
    model_name: str
    cfg: dict[str, Any]
    hook_points: list[HookPointInfo]
    tokenizer: TokenizerInfo | None
    limits: Limits


class ServedModel(ModelInfo):
    workers: int = Field(description="processes running it now (0: none, requests get 503)")


class ModelCard(BaseModel):
    """A served model as OpenAI's ``GET /v1/models`` lists one (OpenAI SDKs read these)."""

    id: str = Field(description="the model's name, as requests name it")
    object: Literal["model"] = "model"
    created: int = Field(0, description="not tracked: 0")
    owned_by: str = "hooklab"


class ModelsResponse(BaseModel):
    """``GET /v1/models``: every model served, the default (what a request naming no model
    gets) first — in full under ``models``, and as OpenAI lists them under ``data``."""

    models: list[ServedModel]
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Capabilities(BaseModel):
    auth: bool = Field(description="requests need 'Authorization: Bearer <key>'")
    model: str
    limits: Limits
    quotas: dict[str, int] = Field(description="each key's quotas unless set for that key")
    ops: list[str] = Field(description="the operations (routes)")
    spec_ops: list[str] = Field(description="the hook-spec operations")
    dtypes: list[str] = Field(description="tensor dtype codes accepted and returned")
    graph_versions: list[int] = Field(
        default_factory=list, description="traced hook graph versions ('graph_v') accepted"
    )
    opset: str = Field("", description="the op vocabulary of traced hook graphs")
    graph_ops: list[str] = Field(
        default_factory=list, description="the ops a traced hook graph may use"
    )
    callbacks: bool = Field(
        False, description="hook functions may run on the client (websocket /v1/callbacks)"
    )
