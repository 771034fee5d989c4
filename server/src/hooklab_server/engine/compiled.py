"""An optional ``torch.compile`` of the no-hook fast path (issue 18), off by default.

What is compiled: a block's own ``forward`` (one code path, eager or compiled) run with
:data:`SILENT`, a hook run that does nothing and never reads a hook name. A block runs compiled
only when the call's hook run touches nothing in its layer (no hook function, capture, SAE,
exact-name request, and no gradients); otherwise that layer runs eagerly, exactly as without
compile. So hooks, captures and SAEs keep their semantics, but a run's numbers then depend on
which layers it touches (within float rounding, ~1e-6 in fp32): the bit-for-bit capture
invariance of the eager engine holds only with compile off, one reason it is opt-in.

Which calls (decode steps only on CUDA unless asked for, see ``decode``):

* A forward without past keys (``forward``, ``run_with_cache``, a generation's prefill): one
  graph for every layer (``inline_inbuilt_nn_modules`` passes each block's weights as inputs;
  the hook names differ per layer but are never read, so no guard tells layers apart).
* A decode pool step (``engine/decode_pool.py``, what the server's generations decode in):
  the pool's keys and values are fixed-size tensors written in place. On CUDA this graph is
  compiled with ``mode="reduce-overhead"`` (CUDA graphs) — untested here (no GPU on the
  machine that wrote it).
* A step of a solo cached generation (a :class:`LayerKV` past, ``generate``): the keys are
  written into preallocated room inside the graph. Its first step (the prefill's keys, views of
  the fused product) and the later ones (views of the room) differ in strides: three graphs.
  (With automatic dynamic shapes instead of ``dynamic=True``, inductor failed on these aliased
  inputs, torch 2.13: "size_bytes_is_heap_allocated".)

Shapes: compiled with symbolic sizes from the first call (``dynamic=True``), so one graph
serves every prompt length, key width and batch size; dynamo still specialises a size of 1
(one row) and the padding (a padded forward's position ids are [batch, pos], an unpadded one's
[pos]). :func:`warm_up` compiles those variants at start-up (one and two rows, padded and not;
pool steps of one and of three rows; solo generations of one and two rows), so requests find
their graphs ready. A shape that still
misses a guard recompiles, at most ``recompile_limit`` (8) times per kind, after which dynamo
runs that kind eagerly: the same results at eager speed, never an unbounded series of compiles.
(Automatic dynamic shapes — a static graph first, a symbolic one at the first new size — took a
compile more per variant, each 10-50 s on a busy 2-core CPU.)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .components.attention import AttentionMask, LayerKV, PooledKV
from .components.block import TransformerBlock
from .hook_points import HookFn, HookRun

if TYPE_CHECKING:
    from .model import HookedTransformer

log = logging.getLogger("hooklab_server")

BlockOutput = tuple[torch.Tensor, LayerKV | None]


class _NoFunctions(dict[str, list[HookFn]]):
    """No hook functions, answered without reading the name (a name read is a per-layer guard)."""

    def __contains__(self, key: object) -> bool:
        return False


class SilentRun(HookRun):
    """A hook run with nothing at any point, whose answers never depend on the hook name, so
    that one compiled graph serves every layer."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()
        self.fns = _NoFunctions()

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def wants(self, name: str) -> bool:
        return False

    def asks_for(self, name: str) -> bool:
        return False

    def runs_per_call(self, name: str) -> bool:
        return False

    def wants_gradient(self, name: str) -> bool:
        return False

    def flat_rows(self, batch: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
        return self


SILENT = SilentRun()


# One function per kind of call: each has its own dynamo cache (and recompile limit).
def _prefill_block(
    block: TransformerBlock,
    resid: torch.Tensor,
    positions: torch.Tensor,
    mask: AttentionMask,
    past: None,
) -> BlockOutput:
    return block(resid, SILENT, positions, mask, past)


def _cached_block(
    block: TransformerBlock,
    resid: torch.Tensor,
    positions: torch.Tensor,
    mask: AttentionMask,
    past: LayerKV,
) -> BlockOutput:
    return block(resid, SILENT, positions, mask, past)


def _pooled_block(
    block: TransformerBlock,
    resid: torch.Tensor,
    positions: torch.Tensor,
    mask: AttentionMask,
    past: PooledKV,
) -> BlockOutput:
    return block(resid, SILENT, positions, mask, past)


def compiler_available() -> bool:
    """Whether inductor can build its CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


class CompiledBlocks:
    """The compiled block forwards of one model, and which layers of a call may use them.

    ``decode``: compile decode steps too (cached and pooled); None: on CUDA only. Measured on
    this project's 2-core CPU (bench/engine.py --compile, gpt2-small, one thread) compiled
    decode steps were slower than eager ones (8 rows: 46 vs 61 tokens/s solo, 56 vs 61 in a
    pool) while compiled forwards were even (395 vs 397 ms at 1x128): the steps are bound by
    the weights' memory traffic, and the graph copies key/value room that eager writes in
    place. CUDA graphs remove launch overhead, which is what decode steps pay on a GPU."""

    def __init__(self, model: HookedTransformer, decode: bool | None = None) -> None:
        cfg = model.cfg
        self.layer_names = [
            frozenset(name for name in model.hook_names if name.startswith(f"blocks.{layer}."))
            for layer in range(cfg.n_layers)
        ]
        cuda = self.cuda_graphs = model.device.type == "cuda"
        self.decode = cuda if decode is None else decode
        self._prefill: Callable[..., BlockOutput] = torch.compile(_prefill_block, dynamic=True)
        self._cached: Callable[..., BlockOutput] = torch.compile(_cached_block, dynamic=True)
        self._pooled: Callable[..., BlockOutput] = torch.compile(
            _pooled_block, dynamic=True, mode="reduce-overhead" if cuda else None
        )

    def touched(self, hooks: HookRun) -> frozenset[str] | None:
        """The names a hook run does anything at; None: every layer (gradients)."""
        if hooks.gradients:
            return None
        if not (hooks.fns or hooks.capture or hooks.explicit or hooks.saes):
            return frozenset()
        return frozenset((*hooks.fns, *hooks.capture, *hooks.explicit, *hooks.saes))

    def serves(self, layer: int, touched: frozenset[str] | None, past: object) -> bool:
        if touched is None or (past is not None and not self.decode):
            return False
        return not touched or touched.isdisjoint(self.layer_names[layer])

    def __call__(
        self,
        block: TransformerBlock,
        resid: torch.Tensor,
        positions: torch.Tensor,
        mask: AttentionMask,
        past: LayerKV | PooledKV | None,
    ) -> BlockOutput:
        query = resid.shape[1]
        # Checked per call (a few pointer reads): a replaced weight must not be read as a view.
        _prepare_fused(block)
        # The mask's lazily made blocked-key table, made here once: made inside the graph it
        # would be a side effect and the next layer a different guard.
        if past is None:
            mask.blocked(query, query, resid.device)
            return self._prefill(block, resid, positions, mask, None)
        if isinstance(past, LayerKV):
            mask.blocked(query, past.keys.shape[1] + query, resid.device)
            return self._cached(block, resid, positions, mask, past)
        mask.blocked(query, past.width, resid.device)
        # Nothing in this layer is hooked for any generation: their spans are not needed, and
        # how many there are would otherwise be a guard.
        past = dataclasses.replace(past, spans=[])
        if not self.cuda_graphs:
            return self._pooled(block, resid, positions, mask, past)
        # Every layer replays one CUDA graph, whose output memory the next replay reuses: each
        # call starts a new step and the output leaves that memory (untested: no GPU here).
        torch.compiler.cudagraph_mark_step_begin()
        out, present = self._pooled(block, resid, positions, mask, past)
        return out.clone(), present


def _prepare_fused(block: TransformerBlock) -> None:
    """Let the fused q/k/v and gate/up weights be traced as views (components/fused.py)."""
    attn, mlp = block.attn, block.mlp
    attn._qkv_weight.prepare_trace((attn.w_q, attn.w_k, attn.w_v))
    if attn.b_q is not None and attn.b_k is not None and attn.b_v is not None:
        attn._qkv_bias.prepare_trace([b.view(-1, 1) for b in (attn.b_q, attn.b_k, attn.b_v)])
    if mlp.w_gate is not None:
        mlp._gate_up.prepare_trace((mlp.w_gate, mlp.w_in))


def enable_compile(
    model: HookedTransformer,
    pool_rows: int = 16,
    pool_positions: int = 512,
    warm: bool = True,
    decode: bool | None = None,
) -> float:
    """Compile ``model``'s no-hook path and warm it up; returns the seconds it took (logged).
    ``pool_rows``/``pool_positions``: the decode pool the server will use (its shapes);
    ``warm=False`` leaves each compile to the first call that needs it (tests); ``decode``:
    compile decode steps too (None: on CUDA only, see :class:`CompiledBlocks`)."""
    if not compiler_available():
        raise RuntimeError("torch.compile needs a C++ compiler (g++ or clang++) on the PATH")
    started = time.perf_counter()
    model.compiled = CompiledBlocks(model, decode)
    if not warm:
        return 0.0
    warm_up(model, pool_rows, pool_positions)
    seconds = time.perf_counter() - started
    log.info(
        "compiled the no-hook path in %.1f s (%d layers share the graphs; decode steps %s; the "
        "layers a call hooks or captures run eagerly)",
        seconds, model.cfg.n_layers, "compiled" if model.compiled.decode else "eager",
    )  # fmt: skip
    return seconds


def warm_up(model: HookedTransformer, pool_rows: int = 16, pool_positions: int = 512) -> None:
    """Run the variants requests will use, so their compiles happen now: forwards of one and
    two rows, unpadded and left-padded, decode pool steps of one and of three rows, and solo
    generations of one and two rows."""
    from .decode_pool import DecodePool

    cfg = model.cfg
    device = model.device

    def tokens(rows: int, length: int) -> torch.Tensor:
        return torch.randint(0, cfg.d_vocab, (rows, length), device=device)

    length = max(2, min(8, cfg.n_ctx // 2))
    for rows in (1, 2):
        model(tokens(rows, length))
        mask = torch.ones(rows, length, dtype=torch.long, device=device)
        mask[:, : length // 2] = 0  # left padding
        model(tokens(rows, length), attention_mask=mask)
    assert model.compiled is not None
    if not model.compiled.decode:
        return
    positions = min(pool_positions, cfg.n_ctx)
    pool = DecodePool(model, max_rows=max(3, pool_rows), max_positions=positions)
    prompt = max(1, min(4, positions - 4))
    one, _ = pool.join(tokens(1, prompt))
    pool.step({one: tokens(1, 1)[0]})
    two, _ = pool.join(tokens(2, prompt))
    for _ in range(2):
        pool.step({one: tokens(1, 1)[0], two: tokens(2, 1)[:, 0]})
    pool.leave(two)
    pool.leave(one)
    for rows in (1, 2):
        model.generate(tokens(rows, prompt), max_new_tokens=4, do_sample=False, stop_at_eos=False)
