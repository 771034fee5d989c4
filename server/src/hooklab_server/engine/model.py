"""The hooked transformer: embeddings, blocks, final norm and unembedding, run with per-call hooks.

The model is read-only once loaded: hook functions and captures live in the :class:`HookRun` of
each call, so one instance serves concurrent requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .catalogue import hook_names
from .compiled import CompiledBlocks
from .components.attention import AttentionMask, LayerKV, PooledKV
from .components.block import TransformerBlock
from .components.embed import Embed, PosEmbed, Unembed
from .components.norm import Norm
from .components.rotary import RopeScaling, Rotary, layer_scaling
from .config import HookedConfig
from .hook_points import HookFn, HookRun, NameOrPredicate, build_hook_run
from .saes import SparseAutoencoder
from .tokenization import PaddingSide, Tokenization, attention_mask_for
from .weights import WeightViews

ReturnType = Literal["logits", "loss", "both"] | None
FwdHooks = Iterable[tuple[NameOrPredicate, HookFn]]


class Output(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor


@dataclass
class KVCache:
    """Keys and values of the positions already processed, for incremental decoding."""

    layers: list[LayerKV | None]
    attention_mask: torch.Tensor | None = None  # [batch, cached_pos], None = no padding
    # Positions to preallocate room for (a generation's prompt plus new tokens); 0: as needed.
    reserve: int = 0

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first.keys.shape[1]


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd recording, even inside inference mode (where the server runs every unit)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def backward(objective: torch.Tensor) -> None:
    """Backpropagate a scalar objective to the activations of its forward."""
    if objective.numel() != 1:
        raise ValueError(
            f"a backward pass needs a scalar objective, got shape {list(objective.shape)} "
            "(TransformerLens: return_type='loss', or reduce your metric to one value)"
        )
    with autograd_on():
        objective.reshape(()).backward()


def _recordable(value: Any) -> Any:
    """A tensor autograd may save: inference tensors (made under inference mode, such as a
    request's token ids) are copied."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


def lm_cross_entropy_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood; with a mask, pairs touching a pad are skipped."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    predicted = log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
    if attention_mask is None:
        count = predicted.numel()
    else:
        pairs = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        predicted = predicted.masked_fill(~pairs, 0.0)
        count = int(pairs.sum())
    return -predicted if per_token else -predicted.sum() / count


@dataclass
class _Inputs:
    """Where a forward starts: the residual, the token ids (for the loss) and the padding mask."""

    resid: torch.Tensor
    tokens: torch.Tensor | None
    attention_mask: torch.Tensor | None


class HookedTransformer(Tokenization, WeightViews, nn.Module):
    def __init__(self, cfg: HookedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model, cfg.dtype)
        self.pos_embed = (
            PosEmbed(cfg.n_ctx, cfg.d_model, cfg.dtype)
            if cfg.positional_embedding_type == "standard"
            else None
        )
        # One rotary table per base and scaling: Gemma 3's local layers have their own.
        rotaries: dict[tuple[float, RopeScaling], Rotary] = {}
        layer_rotary: list[Rotary | None] = [None] * cfg.n_layers
        if cfg.positional_embedding_type == "rotary":
            assert cfg.rotary_dim is not None
            for layer in range(cfg.n_layers):
                key = (cfg.layer_rotary_base(layer), layer_scaling(cfg, layer))
                if key not in rotaries:
                    rotaries[key] = Rotary(
                        cfg.rotary_dim, cfg.n_ctx, key[0], cfg.rotary_adjacent_pairs, cfg.dtype,
                        key[1],
                    )  # fmt: skip
                layer_rotary[layer] = rotaries[key]
        self.rotary = next(
            (rotary for (base, _), rotary in rotaries.items() if base == cfg.rotary_base), None
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, layer, layer_rotary[layer]) for layer in range(cfg.n_layers)
        )
        self.windows = [cfg.layer_window(layer) for layer in range(cfg.n_layers)]
        self.ln_final = Norm(cfg.normalization_type, cfg.d_model, cfg.eps, "ln_final", cfg.dtype)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab_out, cfg.dtype, cfg.output_logits_soft_cap)
        self.hook_names: list[str] = hook_names(cfg)
        self.saes: dict[str, SparseAutoencoder] = {}  # by the hook point each reads (saes.py)
        # torch.compile of the blocks no hook touches (compiled.py; load_model(compile=True)).
        self.compiled: CompiledBlocks | None = None
        self.requires_grad_(False)
        self.eval()

    # --- hooks ----------------------------------------------------------------------------

    def hook_run(
        self,
        fwd_hooks: FwdHooks = (),
        names_filter: NameOrPredicate | Sequence[str] | None = None,
        capture: bool = False,
        interrupt: Callable[[], None] | None = None,
        bwd_hooks: FwdHooks = (),
        incl_bwd: bool = False,
    ) -> HookRun:
        return build_hook_run(
            self.hook_names, fwd_hooks, names_filter, capture, interrupt, bwd_hooks, incl_bwd,
            self.saes,
        )  # fmt: skip

    # --- forward --------------------------------------------------------------------------

    def forward(
        self,
        input: str | list[str] | torch.Tensor,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        start_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache: KVCache | None = None,
        *,
        fwd_hooks: FwdHooks = (),
        hooks: HookRun | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> Any:
        """TransformerLens's ``forward``; ``fwd_hooks`` apply to this call only. ``interrupt``
        (not in TransformerLens) is called before every block: raising from it stops the call.

        Under inference mode, unless ``hooks`` asks for gradients: then the output carries an
        autograd graph over the activations (the weights stay frozen), ready for ``backward``."""
        run = hooks if hooks is not None else self.hook_run(fwd_hooks, interrupt=interrupt)
        if run.gradients:
            with autograd_on():
                input, tokens, attention_mask = (
                    _recordable(value) for value in (input, tokens, attention_mask)
                )
        with autograd_on() if run.gradients else torch.inference_mode():
            inputs = self._inputs(
                input, prepend_bos, padding_side, start_at_layer, tokens, attention_mask,
                past_kv_cache, run,
            )  # fmt: skip
            return self._run(
                inputs,
                run,
                return_type,
                loss_per_token,
                start_at_layer,
                stop_at_layer,
                past_kv_cache,
            )

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NameOrPredicate | Sequence[str] | None = None,
        fwd_hooks: FwdHooks = (),
        remove_batch_dim: bool = False,
        device: str | torch.device | None = None,
        return_cache_object: bool = True,
        interrupt: Callable[[], None] | None = None,
        incl_bwd: bool = False,
        bwd_hooks: FwdHooks = (),
        **kwargs: Any,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Forward that also returns the activations named by ``names_filter`` (after any hook
        functions at those points ran), in firing order, as a dict (``return_cache_object`` is
        accepted for TransformerLens compatibility; the client builds the ActivationCache).

        ``incl_bwd``: as TransformerLens, the output (a scalar: ``return_type="loss"``) is
        backpropagated and ``{name}_grad`` entries hold the gradients; ``bwd_hooks`` (not a
        TransformerLens argument here, where hooks are per call) run during that backward."""
        run = self.hook_run(
            fwd_hooks, names_filter, capture=True, interrupt=interrupt, bwd_hooks=bwd_hooks,
            incl_bwd=incl_bwd,
        )  # fmt: skip
        out = self.forward(*args, hooks=run, **kwargs)
        if run.gradients:
            backward(out)
            out = out.detach()
        cache = run.cache
        if remove_batch_dim:
            cache = {name: value[0] for name, value in cache.items()}
        if device is not None:
            cache = {name: value.to(device) for name, value in cache.items()}
        return out, cache

    def run_with_hooks(self, *args: Any, fwd_hooks: FwdHooks = (), **kwargs: Any) -> Any:
        return self.forward(*args, fwd_hooks=fwd_hooks, **kwargs)

    def _inputs(
        self,
        input: str | list[str] | torch.Tensor,
        prepend_bos: bool | None,
        padding_side: PaddingSide | None,
        start_at_layer: int | None,
        tokens: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past: KVCache | None,
        hooks: HookRun,
    ) -> _Inputs:
        if isinstance(input, str | list):
            input, text_mask = self.tokens_and_mask(input, prepend_bos, padding_side)
            tokens = input
            attention_mask = attention_mask if attention_mask is not None else text_mask
        if start_at_layer is not None:
            if attention_mask is not None:
                attention_mask = attention_mask.to(input.device)
            return _Inputs(input, tokens, attention_mask)
        tokens = input if input.dim() == 2 else input.unsqueeze(0)
        tokens = tokens.to(self.embed.W_E.device)
        if past is not None and past.attention_mask is not None and attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        if attention_mask is not None:
            attention_mask = attention_mask.to(tokens.device)
        return _Inputs(self.embed(tokens, hooks), tokens, attention_mask)

    def tokens_and_mask(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        truncate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokenise text for a forward as TransformerLens does: a padding mask only when the
        padding side is left (right padding leaves real positions exact without one)."""
        prepend_bos, side = self._defaults(prepend_bos, padding_side)
        # side is padding_side or the tokenizer's (a str to transformers, but "left" or "right").
        tokens = self.to_tokens(text, prepend_bos, cast(PaddingSide, side), truncate=truncate)
        if side != "left":
            return tokens, None
        return tokens, attention_mask_for(self._require_tokenizer(), tokens, prepend_bos, side)

    def _positions(
        self,
        batch: int,
        length: int,
        attention_mask: torch.Tensor | None,
        offset: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids ([pos] or [batch, pos]) and a pad marker [batch, pos] (None: no pads).

        With padding, each row counts positions from its first real token, as TransformerLens.
        """
        if attention_mask is None:
            return torch.arange(offset, offset + length, device=device), None
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, offset:]
        return positions, ~attention_mask[:, offset:].bool()

    def _masks(
        self, length: int, attention_mask: torch.Tensor | None, offset: int, device: torch.device
    ) -> dict[int | None, AttentionMask]:
        """The attention mask of each window the layers use (None: global attention)."""
        return {
            window: self._mask(length, attention_mask, offset, device, window)
            for window in set(self.windows)
        }

    def _mask(
        self,
        length: int,
        attention_mask: torch.Tensor | None,
        offset: int,
        device: torch.device,
        window: int | None,
    ) -> AttentionMask:
        total = offset + length
        needs_window = window is not None and total > window
        if attention_mask is None and not needs_window and (offset == 0 or length == 1):
            return AttentionMask(None)
        query = torch.arange(offset, total, device=device)[:, None]
        key = torch.arange(total, device=device)[None, :]
        allowed = key <= query
        if needs_window:
            assert window is not None  # needs_window implies a window
            allowed = allowed & (key > query - window)
        allowed = allowed[None, None]  # [1, 1, query, key]
        if attention_mask is None:
            return AttentionMask(allowed)
        return AttentionMask(allowed & attention_mask.bool()[:, None, None, :])

    def _run(
        self,
        inputs: _Inputs,
        hooks: HookRun,
        return_type: ReturnType,
        loss_per_token: bool,
        start_at_layer: int | None,
        stop_at_layer: int | None,
        past: KVCache | None,
    ) -> Any:
        resid, attention_mask = inputs.resid, inputs.attention_mask
        batch, length = resid.shape[:2]
        offset = past.length if past is not None else 0
        if past is not None and past.attention_mask is not None:
            # A cached mask needs this call's mask too: _inputs makes one from the tokens (all
            # ones when unpadded); from start_at_layer the caller passes it.
            assert attention_mask is not None
            attention_mask = torch.cat((past.attention_mask, attention_mask), dim=1)
        positions, padding = self._positions(batch, length, attention_mask, offset, resid.device)
        if start_at_layer is None and self.pos_embed is not None:
            resid = resid + self.pos_embed(positions, batch, padding, hooks)
        masks = self._masks(length, attention_mask, offset, resid.device)
        layers = range(self.cfg.n_layers)[start_at_layer:stop_at_layer]
        touched = self.compiled.touched(hooks) if self.compiled is not None else None
        for layer in layers:
            if hooks.interrupt is not None:
                hooks.interrupt()
            layer_past = past.layers[layer] if past is not None else None
            mask = masks[self.windows[layer]]
            resid, present = self._run_block(
                layer, resid, hooks, touched, positions, mask, layer_past
            )
            if past is not None:
                if present is not None and past.reserve > present.reserve:
                    present.reserve = past.reserve
                past.layers[layer] = present
        if past is not None:
            past.attention_mask = attention_mask
        if stop_at_layer is not None:
            return resid
        resid = self.ln_final(resid, hooks)  # [batch, pos, d_model]
        if return_type is None:
            return None
        logits = self.unembed(resid, hooks)  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        if inputs.tokens is None:
            raise ValueError("a loss needs the token ids: pass tokens= with start_at_layer")
        loss = lm_cross_entropy_loss(
            logits, inputs.tokens, attention_mask if past is None else None, loss_per_token
        )
        return loss if return_type == "loss" else Output(logits, loss)

    def last_logits(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_kv_cache: KVCache | None = None,
        *,
        hooks: HookRun,
    ) -> torch.Tensor:
        """The last position's logits [batch, d_vocab] of a ``forward`` of ``tokens``, with
        every hook point of that forward (``unembed.hook_out`` still sees every position), but
        the unembedding multiplies the last position only: what generation and a decode pool's
        prefill need (the other positions' logits would be a quarter of a short prefill)."""
        resid = self.forward(
            tokens, attention_mask=attention_mask, past_kv_cache=past_kv_cache, hooks=hooks,
            stop_at_layer=self.cfg.n_layers,
        )  # fmt: skip
        with autograd_on() if hooks.gradients else torch.inference_mode():
            x = self.ln_final(resid, hooks)  # every position: its hooks see the full shapes
            return self.unembed.last_position(x, hooks)

    def _decode_pooled(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        masks: Mapping[int | None, AttentionMask],
        kv: Sequence[PooledKV],
        hooks: HookRun,
    ) -> torch.Tensor:
        """One step of a :class:`~.decode_pool.DecodePool`: a new token per row (``tokens`` and
        ``positions`` [rows]) against each layer's pooled keys and values, with the hook points
        of a cached ``forward`` step; ``masks`` by attention window (``self.windows``). Returns
        the logits [rows, d_vocab]."""
        with torch.inference_mode():
            tokens, positions = tokens[:, None], positions[:, None]
            resid = self.embed(tokens, hooks)
            if self.pos_embed is not None:
                resid = resid + self.pos_embed(positions, tokens.shape[0], None, hooks)
            touched = self.compiled.touched(hooks) if self.compiled is not None else None
            for layer in range(self.cfg.n_layers):
                if hooks.interrupt is not None:
                    hooks.interrupt()
                mask = masks[self.windows[layer]]
                resid, _ = self._run_block(layer, resid, hooks, touched, positions, mask, kv[layer])
            resid = self.ln_final(resid, hooks)
            return self.unembed(resid, hooks)[:, -1]  # [rows, d_vocab]

    def _run_block(
        self,
        layer: int,
        resid: torch.Tensor,
        hooks: HookRun,
        touched: frozenset[str] | None,
        positions: torch.Tensor,
        mask: AttentionMask,
        past: LayerKV | PooledKV | None,
    ) -> tuple[torch.Tensor, LayerKV | None]:
        """One block: compiled when compile is on and nothing of this call touches the layer
        (``touched``: what the call hooks or captures, from ``self.compiled``), else eager."""
        block = self._block(layer)
        if self.compiled is not None and self.compiled.serves(layer, touched, past):
            return self.compiled(block, resid, positions, mask, past)
        return block(resid, hooks, positions, mask, past)

    def init_kv_cache(self, reserve: int = 0) -> KVCache:
        """An empty cache; ``reserve``: the length it will reach (room is made once)."""
        return KVCache([None] * self.cfg.n_layers, reserve=reserve)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        from .generation import generate

        return generate(self, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device
