"""Sparse autoencoders served beside the model, in SAELens's saved format.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc``
[d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], ``threshold`` [d_sae] for JumpReLU, and for
a gated SAE ``b_gate``, ``b_mag`` and ``r_mag`` [d_sae] in place of ``b_enc``). Only
safetensors are read (never a pickle), and the config is validated into :class:`SaeConfig`
before a weight is touched.

An SAE attached at a hook point adds SAELens's ``HookedSAETransformer`` points after it
(``{hook}.hook_sae_input`` … ``hook_sae_output``), with the error term kept: the activation
passed on is ``recons + error`` where ``error = input - clean recons``, so the forward is
unchanged (exactly: the input itself is passed on) unless a hook edits the SAE's points. The
SAE runs only on the forwards that hook or capture one of its points.

As in SAELens, a per-head point ([batch, pos, head, d], e.g. ``attn.hook_z``) is flattened to
[batch, pos, head * d] for ``hook_sae_input`` … ``hook_sae_recons`` and shaped back for
``hook_sae_error`` and ``hook_sae_output``; ``hook_sae_recons`` is in the normalised space of a
``constant_norm_rescale`` or ``layer_norm`` SAE (SAELens hooks it before undoing the norm).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .catalogue import SAE_POINTS, hook_names, hook_shape, sae_input_shape
from .catalogue import axis_sizes as catalogue_axis_sizes

if TYPE_CHECKING:
    from .model import HookedTransformer

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
MAX_D_SAE = 2**22  # features of one SAE
MAX_CONFIG_BYTES = 64 * 1024

FEATURE_POINTS = frozenset({"hook_sae_acts_pre", "hook_sae_acts_post"})
Architecture = Literal["standard", "jumprelu", "topk", "gated"]
# SAELens 6.54's values. Only constant_norm_rescale and layer_norm act at inference: its trainer
# folds expected_average_only_in's factor and covariance_whitening into the weights it saves,
# and SAE.load_from_disk applies neither (from_pretrained folds a release's norm_scaling_factor,
# which a folder may carry here as ``norm_scaling_factor``).
Normalization = Literal[
    "none", "expected_average_only_in", "constant_norm_rescale", "layer_norm",
    "covariance_whitening",
]  # fmt: skip
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in


class SaeConfig(BaseModel):
    """The fields of SAELens's ``cfg.json`` the encoder and decoder use (others are ignored);
    both the 5.x layout (``activation_fn_str``, ``activation_fn_kwargs``) and 6.x's
    (``architecture`` with ``k``) are read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architecture: Architecture = "standard"
    d_in: int = Field(ge=1, le=2**16)
    d_sae: int = Field(ge=1, le=MAX_D_SAE)
    apply_b_dec_to_input: bool = True  # SAELens's default, in 6.x and for older configs
    normalize_activations: Normalization = "none"
    norm_scaling_factor: float | None = Field(default=None, gt=0)
    reshape_activations: Literal["none", "hook_z"] = "none"
    k: int | None = Field(default=None, ge=1, le=MAX_D_SAE)
    rescale_acts_by_decoder_norm: bool = False  # topk only
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
        if data.get("hook_name") is None:
            data["hook_name"] = data.get("hook_point")  # before SAELens 6
        # As SAELens reads configs older than 6.0: a bool norm flag, and hook_z SAEs reshaped.
        norm = data.get("normalize_activations")
        if norm is None or norm is False:
            data["normalize_activations"] = "none"
        elif norm is True:
            data["normalize_activations"] = "expected_average_only_in"
        elif norm not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations {norm!r} is not supported (SAELens serves "
                f"{', '.join(NORMALIZATIONS)})"
            )
        hook = data.get("hook_name")
        if "reshape_activations" not in data and isinstance(hook, str) and "hook_z" in hook:
            data["reshape_activations"] = "hook_z"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SaeConfig:
        if self.norm_scaling_factor is not None and (
            self.normalize_activations != "expected_average_only_in"
        ):
            raise ValueError("norm_scaling_factor goes with expected_average_only_in")
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise ValueError("rescale_acts_by_decoder_norm is for topk SAEs")
        if self.architecture == "topk" and (self.k is None or self.k > self.d_sae):
            raise ValueError("a topk SAE needs k between 1 and d_sae")
        return self


# The statistics a run-time normalisation takes from the input, to undo on the reconstruction.
NormStats = tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class SparseAutoencoder:
    """One SAE's weights and SAELens's encode/decode."""

    cfg: SaeConfig
    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    b_enc: torch.Tensor | None = None  # [d_sae], all but gated
    threshold: torch.Tensor | None = None  # [d_sae], JumpReLU
    b_gate: torch.Tensor | None = None  # [d_sae], gated
    b_mag: torch.Tensor | None = None  # [d_sae], gated
    r_mag: torch.Tensor | None = None  # [d_sae], gated

    def __post_init__(self) -> None:
        # Derived once: the gated magnitude path's encoder, topk's decoder-norm rescale.
        self.W_mag = (
            self.W_enc * self.r_mag.exp() if self.r_mag is not None else None
        )  # [d_in, d_sae]
        self.dec_norms = (
            self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        )  # [d_sae]

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def nbytes(self) -> int:
        tensors = (
            self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.b_gate,
            self.b_mag, self.r_mag,
        )  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        """SAELens's run-time normalisation of the SAE input, with what undoes it."""
        x = x.to(self.W_enc.dtype)
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff, coeff)
        if norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)  # unbiased, as SAELens's
            return x / (std + LAYER_NORM_EPS), (mu, std)
        return x, None

    def denormalize(self, y: torch.Tensor, stats: NormStats) -> torch.Tensor:
        if stats is None:
            return y
        if self.cfg.normalize_activations == "constant_norm_rescale":
            return y / stats[0]
        mu, std = stats
        return y * std + mu  # SAELens undoes layer_norm without the eps

    def encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_pre, gate) of a normalised input: the gated SAE's gate is its own path
        (features whose gating pre-activation is positive), not a function of hidden_pre."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.cfg.architecture == "gated":
            assert self.W_mag is not None and self.b_gate is not None and self.b_mag is not None
            gate = x @ self.W_enc + self.b_gate > 0
            return x @ self.W_mag + self.b_mag, gate
        assert self.b_enc is not None
        return x @ self.W_enc + self.b_enc, None

    def activate(self, pre: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            assert self.cfg.k is not None
            if self.dec_norms is not None:
                pre = pre * self.dec_norms
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        acts = pre.relu()
        if self.cfg.architecture == "jumprelu":
            assert self.threshold is not None
            acts = acts * (pre > self.threshold)
        if gate is not None:
            acts = acts * gate
        return acts

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens's ``encode`` of a (flattened) input: the feature activations."""
        return self.activate(*self.encoder(self.normalize(x)[0]))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction in the normalised space (``hook_sae_recons``)."""
        if self.dec_norms is not None:
            acts = acts / self.dec_norms
        return acts @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The clean reconstruction of a (flattened) input, norm undone, in x's dtype."""
        normed, stats = self.normalize(x)
        return self.denormalize(self.decode(self.activate(*self.encoder(normed))), stats).to(
            x.dtype
        )

    def run(
        self, hooks: Callable[[str, torch.Tensor], torch.Tensor], host: str, x: torch.Tensor
    ) -> torch.Tensor:
        """The SAE's hook points in order through ``hooks``; the value passed on from ``host``.

        As SAELens's HookedSAETransformer with the error term: once a hook edits a point, the
        value passed on is the edited reconstruction plus ``x - clean reconstruction of x``."""
        names = {point: f"{host}.{point}" for point in SAE_POINTS}
        edited = getattr(hooks, "fns", {})
        flat = x.flatten(-2) if x.ndim == 4 else x  # a per-head point: heads side by side
        sae_in = hooks(names["hook_sae_input"], flat)
        normed, stats = self.normalize(sae_in)
        pre, gate = self.encoder(normed)
        pre = hooks(names["hook_sae_acts_pre"], pre)
        post = hooks(names["hook_sae_acts_post"], self.activate(pre, gate))
        recons = hooks(names["hook_sae_recons"], self.decode(post).to(x.dtype))
        out = self.denormalize(recons, stats).to(x.dtype).reshape(x.shape)
        changed = any(
            names[point] in edited
            for point in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post",
                          "hook_sae_recons")
        )  # fmt: skip
        clean = self.reconstruct(flat).reshape(x.shape) if changed else out
        error = hooks(names["hook_sae_error"], x - clean)
        changed = changed or names["hook_sae_error"] in edited
        # SAELens computes the error term without gradient, so a backward pass reaches x
        # through the SAE's encoder and decoder only (what feature attributions rely on).
        if changed:
            passed_on = out + error.detach()
        elif out.requires_grad:
            passed_on = x.detach() + (out - out.detach())  # x's own bits, SAELens's gradient
        else:
            passed_on = x
        return hooks(names["hook_sae_output"], passed_on)


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
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    per_feature = {"jumprelu": ("b_enc", "threshold"), "gated": ("b_gate", "b_mag", "r_mag")}
    for name in per_feature.get(cfg.architecture, ("b_enc",)):
        shapes[name] = (cfg.d_sae,)
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
    if cfg.norm_scaling_factor is not None:
        # Folded as SAELens's from_pretrained folds a release's factor (the SAE then reads
        # unscaled activations).
        found["W_enc"] = found["W_enc"] * cfg.norm_scaling_factor
        found["W_dec"] = found["W_dec"] / cfg.norm_scaling_factor
        found["b_dec"] = found["b_dec"] / cfg.norm_scaling_factor
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
    flat = sae_input_shape(shape)
    sizes = catalogue_axis_sizes(cfg, 1, 1)
    if flat is None or sizes.get(flat[-1]) != sae.cfg.d_in:
        fits = "" if flat is None else f"; it reads {flat[-1]} = {sizes.get(flat[-1])}"
        raise SaeLoadError(
            f"an SAE with d_in {sae.cfg.d_in} does not fit {hook!r} (axes {list(shape)}{fits})"
        )
    if sae.cfg.reshape_activations == "hook_z" and len(shape) != 4:
        raise SaeLoadError(
            f"the SAE flattens heads (reshape_activations 'hook_z') but {hook!r} has no head "
            f"axis (axes {list(shape)})"
        )
    model.saes[hook] = sae
    cfg.sae_widths = {**cfg.sae_widths, hook: sae.d_sae}
    model.hook_names = hook_names(cfg)
