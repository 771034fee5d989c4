"""``ActivationCache``: the activations of one forward pass, with TransformerLens 3.9's helpers.

Indexing (full names, ``(name, layer[, type])`` tuples and shorthand such as ``"k1"``) and every
analysis method (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``,
``get_full_resid_decomposition``, ``logit_attrs`` …) give what TransformerLens 3.9's
``ActivationCache`` gives for the same activations and weights.

The ``model`` is duck-typed. The cache reads only ``model.cfg`` (``n_layers``, ``n_heads``,
``d_model``, ``d_mlp``, ``normalization_type``, ``eps``, ``attn_only``, ``device``), the stacked
weights ``W_O`` ``[L, H, d_head, d_model]`` and ``W_out`` ``[L, d_mlp, d_model]``,
``tokens_to_residual_directions``, ``to_single_token``, ``accumulated_bias`` and
``parameter(name)`` (norm weights, KeyError when the model has none). Where TransformerLens calls
the model's ``ln_final`` module, the norm runs here (:mod:`hooklab_analysis._norm`).

Shapes: ``*bp`` below is ``[batch, pos]``, ``[pos]`` without a batch axis, or fewer after an int
``pos_slice``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import Any, Literal

import torch

from ._norm import NORM_TYPES, apply_norm
from .utils import Slice, SliceInput, as_slice, get_act_name

SliceLike = Slice | SliceInput
Tokens = str | int | torch.Tensor

logger = logging.getLogger(__name__)


def _as_2d_projection(project: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """A ``[d_model]`` projection as ``[d_model, 1]``, and whether to squeeze it back at the end."""
    if project is None:
        return None, False
    if project.ndim == 1:
        return project[:, None], True
    return project, False


def _components_first(stack: torch.Tensor) -> torch.Tensor:
    """``[*bp, n, d] -> [n, *bp, d]``: move the concatenated component axis to the front."""
    return stack.movedim(-2, 0)


class ActivationCache:
    """Cached activations of a forward pass, keyed by TransformerLens hook names.

    Args:
        cache_dict: hook name -> activation (``[batch, …]`` unless ``has_batch_dim`` is False).
        model: the model the activations came from (duck-typed, see the module docstring).
        has_batch_dim: whether the activations still have their batch axis.
        has_embed / has_pos_embed: whether ``hook_embed`` / ``hook_pos_embed`` are part of the
            residual stream; by default, whether they are in ``cache_dict`` (as in TL).
    """

    def __init__(
        self,
        cache_dict: MutableMapping[str, torch.Tensor],
        model: Any,
        has_batch_dim: bool = True,
        *,
        has_embed: bool | None = None,
        has_pos_embed: bool | None = None,
    ) -> None:
        self.cache_dict = cache_dict
        self.model = model  # set to None to release the model; the helpers need it
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in cache_dict if has_embed is None else has_embed
        self.has_pos_embed = (
            "hook_pos_embed" in cache_dict if has_pos_embed is None else has_pos_embed
        )

    # ---- dict-like access --------------------------------------------------------------------

    def __getitem__(self, key: str | tuple[Any, ...]) -> torch.Tensor:
        """``cache["blocks.0.hook_resid_post"]``, ``cache["resid_post", -1]``, ``cache["k1"]``,
        ``cache["scale", 0, "ln1"]`` — see :func:`hooklab_analysis.utils.get_act_name`."""
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        if isinstance(key, str):
            return self.cache_dict[get_act_name(key)]
        if len(key) > 1 and key[1] is not None and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return self.cache_dict[get_act_name(*key)]

    def __contains__(self, key: object) -> bool:
        return key in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self) -> KeysView[str]:
        return self.cache_dict.keys()

    def values(self) -> ValuesView[torch.Tensor]:
        return self.cache_dict.values()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict.keys())}"

    def to(self, device: str | torch.device) -> ActivationCache:
        """Move every activation to ``device`` (in place); returns self."""
        self.cache_dict = {name: value.to(device) for name, value in self.cache_dict.items()}
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)`` — global state, as in TransformerLens."""
        logger.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    # ---- batch axis --------------------------------------------------------------------------

    def _batch_size(self) -> int:
        """The most common leading size over the entries (robust to broadcast entries)."""
        shapes = [self._shape(name) for name in self.cache_dict]
        sizes = Counter(shape[0] for shape in shapes if len(shape) > 0)
        return sizes.most_common(1)[0][0] if sizes else 1

    def _shape(self, name: str) -> torch.Size:
        """An entry's shape (a cache whose entries are elsewhere reads it without them)."""
        return self.cache_dict[name].shape

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache (in place); returns self."""
        if not self.has_batch_dim:
            logger.warning("Tried removing batch dimension after already having removed it.")
            return self
        batch_size = self._batch_size()
        if batch_size != 1:
            raise AssertionError(
                f"Cannot remove batch dimension from cache with batch size {batch_size}"
            )
        for name, value in self.cache_dict.items():
            if value.ndim > 0 and value.size(0) == 1:
                self.cache_dict[name] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: SliceLike) -> ActivationCache:
        """A new cache with ``batch_slice`` applied to each batched entry (an int drops it)."""
        batch_slice = as_slice(batch_slice)
        if not self.has_batch_dim:
            raise AssertionError("Cannot index into a cache without a batch dim")
        keeps_batch_dim = batch_slice.mode != "int" and self.has_batch_dim
        batch_size = self._batch_size()
        sliced = {
            name: batch_slice.apply(value, dim=0)
            if value.ndim > 0 and value.size(0) == batch_size
            else value
            for name, value in self.cache_dict.items()
        }
        return type(self)(sliced, self.model, has_batch_dim=keeps_batch_dim)

    # ---- residual stream stacks --------------------------------------------------------------

    def _final_layer(self, layer: int | None) -> int:
        """None and -1 mean the unembed input (``n_layers``)."""
        return self.model.cfg.n_layers if layer is None or layer == -1 else layer

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream after each layer up to the input of ``layer``: ``[n, *bp, d]``.

        Labels ``"0_pre"``, (``"0_mid"`` with ``incl_mid``), …, ``"final_post"`` (the last
        ``resid_post``, when ``layer`` is ``n_layers``/None/-1). With ``apply_ln`` and the full
        stack, each component is normalised by ``ln_final`` with its own statistics (logit lens);
        otherwise by the cached scale of the layer's ln1 (ln2 with ``mlp_input``).
        """
        pos_slice = as_slice(pos_slice)
        n_layers = self.model.cfg.n_layers
        layer = self._final_layer(layer)
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        for index in range(layer + 1):
            if index == n_layers:
                parts.append(self["resid_post", n_layers - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", index])
            labels.append(f"{index}_pre")
            if (incl_mid and index < layer) or (mlp_input and index == layer):
                parts.append(self["resid_mid", index])
                labels.append(f"{index}_mid")
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack,
                layer,
                mlp_input=mlp_input,
                pos_slice=pos_slice,
                has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n_layers,
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The input of ``layer`` split into the outputs that were added to it: ``[n, *bp, d]``.

        Rows ``"embed"``, ``"pos_embed"``, ``"{l}_attn_out"``, ``"{l}_mlp_out"`` … (``mode``
        keeps only attention or MLP outputs; ``mlp_input`` adds ``layer``'s own attention out).
        """
        pos_slice = as_slice(pos_slice)
        layer = self._final_layer(layer)
        cfg = self.model.cfg
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not getattr(cfg, "attn_only", False)
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            if self.has_embed:
                parts.append(self["hook_embed"])
                labels.append("embed")
            if self.has_pos_embed:
                parts.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for index in range(layer):
            if incl_attn:
                parts.append(self["attn_out", index])
                labels.append(f"{index}_attn_out")
            if incl_mlp:
                parts.append(self["mlp_out", index])
                labels.append(f"{index}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # ---- attention heads ---------------------------------------------------------------------

    def compute_head_results(self) -> None:
        """Add ``blocks.{l}.attn.hook_result`` ``[*bp, H, d]`` (``z @ W_O`` per head, no b_O)."""
        first = "blocks.0.attn.hook_result"
        if first in self.cache_dict:
            if self.cache_dict[first].ndim >= 4:
                logger.warning("Tried to compute head results when they were already cached")
                return
            for index in range(self.model.cfg.n_layers):  # stale entries without a head axis
                self.cache_dict.pop(f"blocks.{index}.attn.hook_result", None)
        W_O = self.model.W_O  # [L, H, d_head, d_model]
        for index in range(self.model.cfg.n_layers):
            z = self["z", index, "attn"]  # [*bp, H, d_head]
            result = torch.einsum("...hk,hkd->...hd", z, W_O[index].to(z.device))
            self.cache_dict[f"blocks.{index}.attn.hook_result"] = result

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceLike = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every head's output before ``layer``: ``[layer·H (+1), *bp, d]``, labels ``L0H0`` ….

        ``incl_remainder`` appends ``resid_post[layer - 1]`` minus the sum of the heads.
        """
        pos_slice = as_slice(pos_slice)
        layer = self._final_layer(layer)
        self.compute_head_results()
        n_heads = self.model.cfg.n_heads
        labels = [f"L{index}H{head}" for index in range(layer) for head in range(n_heads)]
        if layer > 0:
            per_layer = [pos_slice.apply(self["result", i, "attn"], dim=-3) for i in range(layer)]
            stack = _components_first(torch.cat(per_layer, dim=-2))
            if incl_remainder:
                resid = pos_slice.apply(self["resid_post", layer - 1], dim=-2)
                stack = torch.cat([stack, (resid - stack.sum(0))[None]])
                labels.append("remainder")
        elif incl_remainder:  # no heads: the remainder is everything (resid_post of layer -1)
            stack = pos_slice.apply(self["resid_post", layer - 1], dim=-2)[None]
            labels.append("remainder")
        else:
            embed_shape = pos_slice.apply(self["hook_embed"], dim=-2).shape
            stack = torch.zeros(0, *embed_shape, device=self.model.cfg.device)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> torch.Tensor:
        """``cache[activation_name, l, sublayer_type]`` for every ``l < layer``, stacked."""
        layer = self._final_layer(layer)
        return torch.stack([self[activation_name, i, sublayer_type] for i in range(layer)])

    # ---- MLP neurons -------------------------------------------------------------------------

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: SliceLike = None,
        pos_slice: SliceLike = None,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each neuron's output at ``layer``: ``[*bp, n_neurons, d]`` (``post · W_out`` rows).

        ``project_output_onto`` (``[d]`` or ``[d, k]``) is applied to ``W_out`` first, giving
        ``[*bp, n_neurons]`` or ``[*bp, n_neurons, k]`` without the ``d_model`` intermediate.
        """
        W_out = self.model.W_out[layer]  # [d_mlp, d_model]
        return self._neuron_results(
            layer, W_out, as_slice(neuron_slice), as_slice(pos_slice), project_output_onto
        )

    def _neuron_results(
        self,
        layer: int,
        W_out: torch.Tensor,
        neuron_slice: Slice,
        pos_slice: Slice,
        project: torch.Tensor | None,
    ) -> torch.Tensor:
        acts = self["post", layer, "mlp"]  # [*bp, d_mlp]
        W_out = W_out.to(acts.device)
        acts = pos_slice.apply(acts, dim=-2)  # before the neuron slice, which may drop an axis
        acts = neuron_slice.apply(acts, dim=-1)
        W_out = neuron_slice.apply(W_out, dim=0)
        if project is None:
            return acts[..., None] * W_out
        projected = W_out @ project  # [n_neurons] or [n_neurons, k]
        return acts * projected if projected.ndim == 1 else acts[..., None] * projected

    def _neuron_stack_ln_projected(
        self, layer: int, pos_slice: Slice, neuron_slice: Slice, project: torch.Tensor
    ) -> torch.Tensor:
        """Neuron outputs through the cached-scale norm and a ``[d, k]`` projection at once.

        ``LN(a·w) @ p = (a / s) · (w @ p - mean(w) · Σp)``; RMS has no centring term. Always the
        ln1 scale of ``layer`` (ln_final for ``n_layers``). Returns ``[n, *bp, k]``.
        """
        scale = self._cached_ln_scale(layer, False, pos_slice)  # [*bp, 1]
        centre = self.model.cfg.normalization_type in ("LN", "LNPre")
        W_out = self.model.W_out
        parts = []
        for index in range(layer):
            w = neuron_slice.apply(W_out[index], dim=0).to(scale.device)  # [n, d]
            linear = w @ project  # [n, k]
            if centre:
                linear = linear - w.mean(-1)[:, None] * project.sum(0)[None, :]
            acts = neuron_slice.apply(pos_slice.apply(self["post", index, "mlp"], dim=-2), dim=-1)
            parts.append((acts / scale)[..., None] * linear)
        if not parts:
            shape = pos_slice.apply(self["hook_embed"], dim=-2).shape[:-1]
            return torch.zeros(0, *shape, project.shape[-1], device=self.model.cfg.device)
        return _components_first(torch.cat(parts, dim=-2))

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: SliceLike = None,
        neuron_slice: SliceLike = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every neuron's output before ``layer``: ``[layer·n_neurons (+1), *bp, d]``.

        Labels ``L0N0`` …; ``incl_remainder`` appends ``resid_post[layer - 1]`` minus the sum.
        An int ``neuron_slice`` keeps its neuron axis (TransformerLens fails on it).
        """
        layer = self._final_layer(layer)
        neuron_slice = as_slice(neuron_slice)
        if isinstance(neuron_slice.slice, int):  # mode "int"
            neuron_slice = Slice([neuron_slice.slice])
        pos_slice = as_slice(pos_slice)
        project, squeeze = _as_2d_projection(project_output_onto)
        neurons = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0)
        labels = [f"L{index}N{int(n)}" for index in range(layer) for n in neurons]

        if apply_ln and project is not None:
            stack = self._neuron_stack_ln_projected(layer, pos_slice, neuron_slice, project)
            if incl_remainder:
                resid = pos_slice.apply(self["resid_post", layer - 1], dim=-2)
                resid = self.apply_ln_to_stack(resid[None], layer, pos_slice=pos_slice)[0]
                remainder = resid @ project
                if stack.shape[0] > 0:
                    remainder = remainder - stack.sum(0)
                stack = torch.cat([stack, remainder[None]])
                labels.append("remainder")
        else:
            if layer > 0:
                W_out = self.model.W_out  # [L, d_mlp, d_model]
                per_layer = [
                    self._neuron_results(i, W_out[i], neuron_slice, pos_slice, project)
                    for i in range(layer)
                ]
                stack = _components_first(torch.cat(per_layer, dim=-2))
            else:
                shape: tuple[int, ...] = pos_slice.apply(self["hook_embed"], dim=-2).shape
                if project is not None:
                    shape = (*shape[:-1], project.shape[-1])
                stack = torch.zeros(0, *shape, device=self.model.cfg.device)
            if incl_remainder:
                remainder = pos_slice.apply(self["resid_post", layer - 1], dim=-2)
                if project is not None:
                    remainder = remainder @ project
                if layer > 0:
                    remainder = remainder - stack.sum(0)
                stack = torch.cat([stack, remainder[None]])
                labels.append("remainder")
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)

        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # ---- layer norm --------------------------------------------------------------------------

    def _cached_ln_scale(
        self,
        layer: int | None,
        mlp_input: bool,
        pos_slice: Slice,
        batch_slice: Slice | None = None,
    ) -> torch.Tensor:
        """The cached norm scale read by ``layer`` (``[*bp, 1]``), sliced like the stack."""
        if layer is None or layer == self.model.cfg.n_layers:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        try:
            scale = self[key]
        except KeyError as e:
            raise KeyError(
                f"Cached LN scale not found at '{key}'. apply_ln operations need this hook "
                "in the cache (run_with_cache with a names_filter that keeps it)."
            ) from e
        scale = pos_slice.apply(scale, dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """Normalise each component of ``residual_stack`` ``[n, *bp, d]`` as ``layer`` sees it.

        The cached scale of ``layer``'s ln1 (ln2 with ``mlp_input``; ``ln_final`` for
        ``n_layers``/None/-1) divides every component, after centring for LN models — the norm as
        a linear map. ``pos_slice`` is applied to the scale only: the stack must already be
        sliced. ``recompute_ln`` (unembed only) instead runs ``ln_final`` on each component with
        its own statistics, weights included. Models without a norm return the stack unchanged.
        """
        cfg = self.model.cfg
        if cfg.normalization_type not in NORM_TYPES:
            return residual_stack
        pos_slice = as_slice(pos_slice)
        batch_slice = as_slice(batch_slice)
        layer = self._final_layer(layer)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == cfg.n_layers:
            return apply_norm(self.model, residual_stack, "ln_final")
        if cfg.normalization_type in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = self._cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        return residual_stack / scale

    # ---- attribution -------------------------------------------------------------------------

    def _token_shape(self, tokens: Tokens) -> torch.Size:
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        return torch.as_tensor(tokens).shape

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: Tokens,
        incorrect_tokens: Tokens | None = None,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct contribution to the logit of ``tokens``: ``[n, *bp]``.

        The stack goes through the cached final-norm scale, then is dotted with the unembedding
        directions of ``tokens`` (minus those of ``incorrect_tokens``, which must have the same
        shape). Tokens may be a string, an int, or a ``[]``, ``[batch]`` or ``[batch, pos]``
        tensor.
        """
        directions: torch.Tensor = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            shape, incorrect_shape = self._token_shape(tokens), self._token_shape(incorrect_tokens)
            if shape != incorrect_shape:
                raise ValueError(
                    "tokens and incorrect_tokens must have the same shape! "
                    f"(tokens.shape={shape}, incorrect_tokens.shape={incorrect_shape})"
                )
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack,
            layer=-1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )
        return (scaled * directions.to(scaled.device)).sum(-1)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        return_labels: bool = False,
        project_output_onto: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The input of ``layer`` as a sum of every head, neuron (or MLP), embedding and bias.

        Rows in order: heads ``L·H`` (through ``layer`` itself with ``mlp_input``), neurons
        ``L·d_mlp`` (or ``L`` MLP outputs without ``expand_neurons``), ``"embed"``,
        ``"pos_embed"``, ``"bias"`` (the accumulated output biases). Summing the rows gives the
        residual stream. ``[n, *bp, d]``, or ``[n, *bp(, k)]`` with ``project_output_onto``.
        """
        layer = self._final_layer(layer)
        pos_slice = as_slice(pos_slice)
        project, squeeze = _as_2d_projection(project_output_onto)
        fused = apply_ln and project is not None  # normalise per part, then project

        def finish(part: torch.Tensor) -> torch.Tensor:
            if fused:
                part = self.apply_ln_to_stack(part, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            return part @ project if project is not None else part

        heads, labels = self.stack_head_results(
            layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True
        )
        heads = finish(heads)
        parts = [heads]
        if not getattr(self.model.cfg, "attn_only", False) and layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(
                    layer,
                    pos_slice=pos_slice,
                    return_labels=True,
                    apply_ln=fused,
                    project_output_onto=project,
                )
                parts.append(neurons)
                labels.extend(neuron_labels)
            else:
                mlps, mlp_labels = self.decompose_resid(
                    layer,
                    mlp_input=mlp_input,
                    pos_slice=pos_slice,
                    incl_embeds=False,
                    mode="mlp",
                    return_labels=True,
                )
                parts.append(finish(mlps))
                labels.extend(mlp_labels)
        if self.has_embed:
            parts.append(finish(pos_slice.apply(self["embed"], -2)[None]))
            labels.append("embed")
        if self.has_pos_embed:
            parts.append(finish(pos_slice.apply(self["pos_embed"], -2)[None]))
            labels.append("pos_embed")

        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        bias = bias.to(heads.device)  # [d_model]
        if fused:
            bias = finish(bias.expand((1, *heads.shape[1:-1], self.model.cfg.d_model)))
        else:
            if project is not None:
                bias = bias @ project
            bias = bias.expand((1, *heads.shape[1:]))
        parts.append(bias)
        labels.append("bias")

        stack = torch.cat(parts)
        if apply_ln and not fused:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack


__all__ = ["ActivationCache"]
