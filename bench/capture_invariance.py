"""What "the same numbers whatever is captured" costs: the engine's forward against the fused
kernels it used to switch to, both as a ratio to Hugging Face measured in the same run.

    .venv/bin/python bench/capture_invariance.py          # gpt2-small-sized: 1x128, 8x128, 1x1024
    .venv/bin/python bench/capture_invariance.py --quick  # smoke run: 1x128, 2 runs
    .venv/bin/python bench/capture_invariance.py --models gpt2,smollm2 --threads 1

The engine runs TransformerLens's arithmetic on every forward — attention as ``q @ k^T / scale``,
masked softmax, ``pattern @ v``; norms by TransformerLens's formula — so a plain forward, any
``run_with_cache`` and runs with read-only hook functions give the same bits. Before, a forward
that neither hooked nor captured a layer's scores/pattern took ``scaled_dot_product_attention``
there, and one that did not hook a norm took ``F.layer_norm``/``F.rms_norm``: faster kernels
that round differently, so a run's numbers depended on what it captured.

Candidates, per batch of seeded random token ids (every forward is plain, without hooks):

* engine — as it is (TransformerLens's arithmetic everywhere);
* fused (before) — the same loaded model with its attention and norms swapped, on this instance
  only, for the fused kernels the engine used to take on a plain forward (the code below is
  those kernels as the engine called them; hooks are ignored, none are given);
* HF — ``AutoModelForCausalLM``, eval, SDPA attention, ``inference_mode``: the reference both
  are divided by.

"same bits" says whether the candidate's plain-forward logits equal, bit for bit, the engine's
``run_with_cache`` of every hook point (the explicit path both versions took when capturing).
Timings are interleaved (each repetition runs every candidate once, in a rotating order) and the
table shows medians; fp32 on the CPU, ``torch.set_num_threads(2)`` unless ``--threads``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _serving import gpt2_small_checkpoint  # noqa: E402
from _table import print_table  # noqa: E402
from engine import interleaved_medians, smollm2_checkpoint, smollm2_unavailable  # noqa: E402

from fixtures.oracle import load_hf_model  # noqa: E402
from hooklab_server.engine import HookedTransformer, load_model  # noqa: E402
from hooklab_server.engine.components.attention import Attention, AttentionMask  # noqa: E402
from hooklab_server.engine.components.norm import Norm  # noqa: E402
from hooklab_server.engine.hook_points import HookRun  # noqa: E402

THREADS = 2
SHAPES = ((1, 128), (8, 128), (1, 1024))
SEED = 0
LOADS: list[float] = []


# --------------------------------------------------------------------------------------------
# The fused kernels of the engine before (plain forwards only)
# --------------------------------------------------------------------------------------------


def fused_attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hooks: Callable[[str, torch.Tensor], torch.Tensor],
    mask: AttentionMask,
) -> torch.Tensor:
    """torch's fused attention, as the engine called it when nothing wanted scores or pattern
    (CPU: grouped-query heads through ``enable_gqa``)."""
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.allowed,
        is_causal=mask.allowed is None and q.shape[1] > 1,
        scale=1.0 / attn.attn_scale,
        enable_gqa=attn.n_kv_heads != attn.n_heads,
    )
    return z.transpose(1, 2)  # [batch, pos, n_heads, d_head]


def fused_norm(norm: Norm, x: torch.Tensor, hooks: HookRun) -> torch.Tensor:
    """``F.layer_norm`` / ``F.rms_norm``, as the engine called them when no hook wanted the norm."""
    dtype = x.dtype
    wide = x if dtype in (torch.float32, torch.float64) else x.float()
    if norm.centre:
        out = F.layer_norm(wide, (norm.length,), eps=norm.eps).to(dtype)
    else:
        out = F.rms_norm(wide, (norm.length,), eps=norm.eps).to(dtype)
    if norm.w is not None:
        out = out * norm.w
    if norm.b is not None:
        out = out + norm.b
    return out


def with_fused_kernels(model: HookedTransformer) -> HookedTransformer:
    """Swap the kernels on this instance only (its methods, not the classes')."""
    for module in model.modules():
        if isinstance(module, Attention):
            module._attend = MethodType(fused_attend, module)  # type: ignore[method-assign]
        elif isinstance(module, Norm):
            module.forward = MethodType(fused_norm, module)  # type: ignore[method-assign]
    return model


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

HEADERS = [
    "model", "batch", "engine", "fused (before)", "HF", "engine/HF", "fused/HF", "cost",
    "same bits: engine", "fused",
]  # fmt: skip


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def same_bits(engine: Any, candidate: Any, tokens: torch.Tensor) -> str:
    """Whether ``candidate``'s plain logits equal the engine's full-cache logits bit for bit."""
    reference, _ = engine.run_with_cache(tokens)
    logits = candidate(tokens)
    if torch.equal(logits, reference):
        return "yes"
    return f"no ({float((logits - reference).abs().max()):.1e})"


def forward_candidates(
    engine: Any, fused: Any, hf: Any, tokens: torch.Tensor
) -> dict[str, Callable[[], object]]:
    mask = torch.ones_like(tokens)

    def hf_forward() -> object:
        with torch.inference_mode():
            return hf(input_ids=tokens, attention_mask=mask).logits

    return {"engine": lambda: engine(tokens), "fused": lambda: fused(tokens), "HF": hf_forward}


def bench_model(
    label: str, checkpoint: Path, shapes: tuple[tuple[int, int], ...], runs: int
) -> list[list[str]]:
    print(f"[{label}] loading the engine twice and HF from {checkpoint} …", flush=True)
    engine = load_model(checkpoint)
    fused = with_fused_kernels(load_model(checkpoint))
    hf = load_hf_model(checkpoint, attn_implementation="sdpa")
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    low = [i for i in tokenizer.all_special_ids if i < 16]  # keep clear of pads (fixture vocab)
    first, vocab = (max(low) + 1 if low else 0), min(len(tokenizer), engine.cfg.d_vocab)
    generator = torch.Generator().manual_seed(SEED)
    rows: list[list[str]] = []
    for batch, pos in shapes:
        tokens = torch.randint(first, vocab, (batch, pos), generator=generator)
        candidates = forward_candidates(engine, fused, hf, tokens)
        print(f"[{label}] {batch}x{pos} …", flush=True)
        t = interleaved_medians(candidates, runs if batch * pos <= 1024 else max(2, runs // 2))
        row = [
            label, f"{batch}x{pos}", ms(t["engine"]), ms(t["fused"]), ms(t["HF"]),
            f"{t['engine'] / t['HF']:.2f}x", f"{t['fused'] / t['HF']:.2f}x",
            f"{t['engine'] / t['fused'] - 1:+.1%}",
            same_bits(engine, engine, tokens), same_bits(engine, fused, tokens),
        ]  # fmt: skip
        LOADS.append(os.getloadavg()[0])
        print("  " + " | ".join(row[1:]), flush=True)
        rows.append(row)
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1x128, 2 runs")
    parser.add_argument("--models", default="gpt2", help="comma-separated: gpt2, smollm2")
    parser.add_argument("--runs", type=int, default=7, help="timed repetitions (default 7)")
    parser.add_argument(
        "--shapes", default=",".join(f"{b}x{p}" for b, p in SHAPES),
        help="comma-separated batch x positions (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=THREADS,
        help=f"torch.set_num_threads (default {THREADS}; 1 is steadier on a busy machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    if set(models) - {"gpt2", "smollm2"}:
        parser.error("choose models from gpt2, smollm2")
    shapes = tuple(
        (int(b), int(p)) for b, p in (shape.split("x") for shape in args.shapes.split(","))
    )
    shapes, runs = (((1, 128),), 2) if args.quick else (shapes, args.runs)

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, CPU ({os.cpu_count()} cores); "
          f"medians of {runs} interleaved runs (1x1024: half as many) after 1 warm-up round",
          flush=True)  # fmt: skip
    LOADS.append(os.getloadavg()[0])
    start = time.perf_counter()
    rows: list[list[str]] = []
    for name in models:
        if name == "gpt2":
            source, label = gpt2_small_checkpoint(), "gpt2-small (random)"
        else:
            reason = smollm2_unavailable()
            if reason is not None:
                print(f"[smollm2] skipped: {reason}", flush=True)
                continue
            source, label = smollm2_checkpoint(), "SmolLM2-135M"
        with source as checkpoint:
            rows += bench_model(label, checkpoint, shapes, runs)
        gc.collect()

    print()
    print_table(HEADERS, rows)
    print()
    print(
        "engine/HF, fused/HF: forward time / HF's in the same run (lower is better); cost: "
        "engine time / fused time - 1, what the invariance costs. same bits: plain-forward "
        "logits == the engine's full-cache logits (torch.equal; else the max |diff|)."
    )
    LOADS.append(os.getloadavg()[0])
    print(
        f"total {time.perf_counter() - start:.0f} s; 1-minute load average median "
        f"{statistics.median(LOADS):.1f}, max {max(LOADS):.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
