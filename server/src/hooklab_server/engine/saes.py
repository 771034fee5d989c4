"""Sparse autoencoders served beside the model, in SAELens's saved format.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc``
[d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], and ``threshold`` [d_sae] for JumpReLU).
Only safetensors are read (never a pickle), and the config is validated into :class:`SaeConfig`
before a weight is touched.

An SAE attached at a hook point adds SAELens's ``HookedSAETransformer`` points after it
(``{hook}.hook_sae_input`` … ``hook_sae_output``), with the error term kept: the activation
passed on is ``recons + error`` where ``error = input - clean recons``, so the forward is
unchanged (exactly: the input itself is passed on) unless a hook edits the SAE's points. The
SAE runs only on the forwards that hook or capture one of its points.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .catalogue import SAE_POINT_NAMES, hook_names, hook_shape
from .catalogue import axis_sizes as catalogue_axis_sizes

if TYPE_CHECKING:
    from .model import HookedTransformer

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MAX_D_SAE = 2**22  # features of one SAE
MAX_CONFIG_BYTES = 64 * 1024

# In firing order, as SAELens's SAE module has them.
SAE_POINTS = SAE_POINT_NAMES
FEATURE_POINTS = frozenset({"hook_sae_acts_pre", "hook_sae_acts_post"})
Architecture = Literal["standard", "jumprelu", "topk"]


class SaeConfig(BaseModel):
    """The fields of SAELens's ``cfg.json`` the encoder and decoder use (others are ignored);
    both the 5.x layout (``activation_fn_str``, ``activation_fn_kwargs``) and 6.x's
    (``architecture`` with ``k``) are read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architecture: Architecture = "standard"
    d_in: int = Field(ge=1, le=2**16)
    d_sae: int = Field(ge=1, le=MAX_D_SAE)
    apply_b_dec_to_input: bool = False
    normalize_activations: str | None = "none"
    k: int | None = Field(default=None, ge=1, le=MAX_D_SAE)
    hook_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_layouts(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("architecture") in ("relu", None):
            data["architecture"] = "standard"
        if data.get("activation_fn_str") == "topk" or data.get("activation_fn") == "topk":
            data["architecture"] = "topk"
        kwargs = data.get("activation_fn_kwargs") or {}
        if data.get("k") is None and isinstance(kwargs, dict) and "k" in kwargs:
            data["k"] = kwargs["k"]
        metadata = data.get("metadata")
        if data.get("hook_name") is None and isinstance(metadata, dict):
            data["hook_name"] = metadata.get("hook_name")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SaeConfig:
        if self.normalize_activations not in (None, "none"):
            raise ValueError(
                f"normalize_activations {self.normalize_activations!r} is not supported "
                "(only 'none')"
            )
        if self.architecture == "topk" and (self.k is None or self.k > self.d_sae):
            raise ValueError("a topk SAE needs k between 1 and d_sae")
        return self


@dataclass
class SparseAutoencoder:
    """One SAE's weights and SAELens's encode/decode."""

    cfg: SaeConfig
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None = None  # [d_sae], JumpReLU

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def nbytes(self) -> int:
        tensors = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            assert self.cfg.k is not None
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        acts = pre.relu()
        if self.cfg.architecture == "jumprelu":
            assert self.threshold is not None
            acts = acts * (pre > self.threshold)
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def run(
        self, hooks: Callable[[str, torch.Tensor], torch.Tensor], host: str, x: torch.Tensor
    ) -> torch.Tensor:
        """The SAE's hook points in order through ``hooks``; the value passed on from ``host``."""
        names = {point: f"{host}.{point}" for point in SAE_POINTS}
        edited = getattr(hooks, "fns", {})
        sae_in = hooks(names["hook_sae_input"], x)
        pre = hooks(names["hook_sae_acts_pre"], self.pre_acts(sae_in))
        post = hooks(names["hook_sae_acts_post"], self.activate(pre))
        recons = hooks(names["hook_sae_recons"], self.decode(post).to(x.dtype))
        changed = any(
            names[point] in edited
            for point in ("hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
        )
        clean = self.decode(self.encode(sae_in)).to(x.dtype) if changed else recons
        error = hooks(names["hook_sae_error"], sae_in - clean)
        changed = changed or names["hook_sae_error"] in edited
        out = recons + error if changed else sae_in
        return hooks(names["hook_sae_output"], out)


class SaeLoadError(ValueError):
    """An SAE folder or upload that cannot be served (said in words a user can act on)."""


def parse_config(text: str | bytes) -> SaeConfig:
    if len(text) > MAX_CONFIG_BYTES:
        raise SaeLoadError(f"an SAE config is at most {MAX_CONFIG_BYTES} bytes")
    try:
        return SaeConfig.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise SaeLoadError(f"invalid SAE config: {exc}") from None


def sae_from_tensors(
    cfg: SaeConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device
) -> SparseAutoencoder:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    found = {}
    for name, shape in shapes.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise SaeLoadError(f"the SAE weights have no {name!r}")
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise SaeLoadError(
                f"SAE weight {name!r} is {list(tensor.shape)} {tensor.dtype}, expected a "
                f"floating tensor of shape {list(shape)}"
            )
        found[name] = tensor.to(device=device, dtype=dtype)
    return SparseAutoencoder(cfg, **found)


def sae_from_bytes(
    config: str | bytes, weights: bytes, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """An SAE from its config JSON and safetensors bytes (an upload)."""
    from safetensors.torch import load

    cfg = parse_config(config)
    expected = 4 * (2 * cfg.d_in * cfg.d_sae + 2 * cfg.d_sae + cfg.d_in)
    if len(weights) > 2 * expected + 2**20:
        raise SaeLoadError("the SAE weights are larger than the config's shapes allow")
    try:
        tensors = load(weights)
    except Exception as exc:  # safetensors raises its own error types
        raise SaeLoadError(f"invalid safetensors: {exc}") from None
    return sae_from_tensors(cfg, tensors, dtype, device)


def load_sae(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """An SAE from a folder SAELens's ``save_model`` wrote."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = parse_config((folder / CONFIG_FILE).read_bytes())
        tensors = load_file(folder / WEIGHTS_FILE)
    except SaeLoadError:
        raise
    except Exception as exc:  # OSError, or safetensors' own error types
        raise SaeLoadError(f"cannot read the SAE in {str(folder)!r}: {exc}") from None
    return sae_from_tensors(cfg, tensors, dtype, device)


def parse_sae_flag(text: str) -> tuple[str, str]:
    """``PATH@HOOK`` -> (path, hook)."""
    path, at, hook = text.rpartition("@")
    if not at or not path or not hook:
        raise ValueError(f"--sae takes PATH@HOOK, not {text!r}")
    return path, hook


def attach_sae(model: HookedTransformer, hook: str, sae: SparseAutoencoder) -> None:
    """Serve ``sae`` at ``hook``: its points join the model's hook points after ``hook``."""
    cfg = model.cfg
    if hook not in model.hook_names or ".hook_sae_" in hook:
        raise SaeLoadError(f"no hook point {hook!r} in this model to attach an SAE to")
    if hook in model.saes:
        raise SaeLoadError(f"an SAE is already attached at {hook!r}")
    shape = hook_shape(hook, cfg)
    sizes = catalogue_axis_sizes(cfg, 1, 1)
    if len(shape) != 3 or shape[:2] != ("batch", "pos") or sizes.get(shape[-1]) != sae.cfg.d_in:
        raise SaeLoadError(
            f"an SAE with d_in {sae.cfg.d_in} does not fit {hook!r} (axes {list(shape)})"
        )
    model.saes[hook] = sae
    cfg.sae_widths = {**cfg.sae_widths, hook: sae.d_sae}
    model.hook_names = hook_names(cfg)
