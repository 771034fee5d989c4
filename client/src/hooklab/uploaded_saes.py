"""Sparse autoencoders uploaded from this machine (``POST /v1/saes``), as SAELens's
``HookedSAETransformer.add_sae`` attaches them: ``model.add_sae(folder)``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hooklab_proto import SAE_POINTS

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


@dataclass(frozen=True)
class UploadedSae:
    """An SAE on the server, owned by this client's key: pass it (or its ``id``) to
    ``run_with_cache_with_saes``, or keep it attached with ``add_sae``."""

    id: str
    hook: str  # the hook point it reads (its cfg.hook_name unless given at upload)
    d_in: int
    d_sae: int
    architecture: str
    nbytes: int
    expires_at: float

    @classmethod
    def from_server(cls, info: dict[str, Any]) -> UploadedSae:
        fields = ("id", "hook", "d_in", "d_sae", "architecture", "nbytes", "expires_at")
        return cls(**{name: info[name] for name in fields})

    @property
    def points(self) -> list[str]:
        return [f"{self.hook}.{point}" for point in SAE_POINTS]


def upload_body(path: str | Path, hook: str | None, ttl_s: float | None) -> dict[str, Any]:
    """The msgpack upload body of a SAELens folder (``save_model``'s cfg.json and
    sae_weights.safetensors), or of the weights file with its cfg.json beside it."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_FILE
    config = (folder / CONFIG_FILE).read_text()
    json.loads(config)  # a readable error here rather than the server's
    body: dict[str, Any] = {"cfg": config, "weights": weights.read_bytes()}
    if hook is not None:
        body["hook"] = hook
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return body


def with_points(hook_names: list[str], saes: list[UploadedSae]) -> list[str]:
    """``hook_names`` with each SAE's points after its hook."""
    by_hook = {sae.hook: sae for sae in saes}
    names: list[str] = []
    for name in hook_names:
        names.append(name)
        if name in by_hook:
            names += by_hook[name].points
    return names
