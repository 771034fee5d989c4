"""Attribution patching: hooklab (remote, loopback) vs TransformerLens 3.9 local, same machine.

    .venv/bin/python bench/gradients.py              # 18 tokens, median of 3
    .venv/bin/python bench/gradients.py --quick      # 8 tokens, one run each: smoke test

A gpt2-small-sized checkpoint (12 layers, d_model 768, 12 heads, vocab 50257, seeded random
weights) served by ``hooklab-server`` in its own process on a loopback port; TransformerLens
3.9 here on the same weights. Clean and corrupted prompts are seeded random ids (batch 1).

The sweep is every head at every position (``z``: layers x positions x heads) and the residual
stream at every position (``resid_pre``), from a logit-difference metric, timed end to end:

* TL local, the Attribution Patching demo's way: ``run_with_cache`` of the clean prompt, the
  corrupted forward and ``metric(logits).backward()`` with caching hooks in both directions,
  then ``grad * (clean - corrupted)`` summed per cell;
* hooklab: ``run_with_cache(clean, store=True)`` then ``get_attr_patch_*`` (one request: the
  corrupted forward and backward run on the server, only the grid comes back);
* one hooklab sweep alone (every head at every position, the clean cache stored beforehand),
  and activation patching of the same grid (``get_act_patch_attn_head_out_by_pos``, batched on
  the server): what attribution approximates, and what it saves.

``forward-equivalents`` divides a time by one remote forward of the corrupted prompt
(``return_type="loss"``, the same round trip with nothing large to send); the target for one
sweep is <= 3. ``max |diff|`` compares hooklab's attribution with TL's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _serving import SEED, interleaved_medians, served_beside_tl
from _table import print_table

from fixtures.checkpoints import GPT2_SMALL
from hooklab import metrics, patching

THREADS = 2
ANSWER, WRONG = 1234, 4321
GRIDS = {"z": "attn_head_out_by_pos", "resid_pre": "resid_pre"}


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def tl_attribution(
    tl: Any, clean: torch.Tensor, corrupted: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The demo's computation, both grids from one backward."""
    wanted = lambda name: name.endswith(("hook_z", "hook_resid_pre"))  # noqa: E731
    with torch.inference_mode():
        _, clean_cache = tl.run_with_cache(clean, names_filter=wanted)
    cache: dict[str, torch.Tensor] = {}
    tl.reset_hooks()
    tl.add_caching_hooks(names_filter=wanted, incl_bwd=True, cache=cache)
    value = logit_diff(tl(corrupted))
    value.backward()
    tl.reset_hooks()
    tl.zero_grad(set_to_none=True)
    base = float(value.detach())
    grids = {}
    with torch.no_grad():
        for short, dims in (("z", (0, 4)), ("resid_pre", (0, 3))):
            names = [f"blocks.{layer}.{'attn.hook_z' if short == 'z' else 'hook_resid_pre'}"
                     for layer in range(tl.cfg.n_layers)]  # fmt: skip
            change = torch.stack(
                [cache[f"{n}_grad"] * (clean_cache[n] - cache[n]) for n in names]
            )  # [layer, batch, pos, (head, d_head) | d_model]
            grids[short] = change.sum(dim=(1, *range(dims[1], change.dim()))) + base
    return grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pos", type=int, default=18, help="prompt length (tokens)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 run each")
    args = parser.parse_args()
    if args.quick:
        args.pos, args.runs = 8, 1
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    clean = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)
    corrupted = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)
    with served_beside_tl(THREADS) as (model, tl):
        rows = run(model, tl, clean, corrupted, args.runs)
    print(
        f"\nattribution patching, gpt2-small-sized (12 layers, d_model 768), batch 1 x "
        f"{args.pos} tokens, CPU, {THREADS} threads, median of {args.runs}\n"
    )
    print_table(
        ["work", "candidate", "seconds", "TL / this", "forward-equivalents", "max |diff| vs TL"],
        rows,
    )


def run(
    model: Any, tl: Any, clean: torch.Tensor, corrupted: torch.Tensor, runs: int
) -> list[list[str]]:
    metric = metrics.logit_diff(ANSWER, WRONG)
    wanted = lambda name: name.endswith(("hook_z", "hook_resid_pre"))  # noqa: E731
    results: dict[str, Any] = {}
    _, stored = model.run_with_cache(clean, names_filter=wanted, store=True)

    def end_to_end() -> None:
        _, cache = model.run_with_cache(clean, names_filter=wanted, store=True)
        results["hooklab"] = {
            short: getattr(patching, f"get_attr_patch_{name}")(model, corrupted, cache, metric)
            for short, name in GRIDS.items()
        }
        model.delete_stored(cache.cache_id)

    def one_sweep() -> None:
        patching.get_attr_patch_attn_head_out_by_pos(model, corrupted, stored, metric)

    def tl_sweep() -> None:
        results["tl"] = tl_attribution(tl, clean, corrupted)

    def forward() -> None:
        model(corrupted, return_type="loss")

    def activation() -> None:
        patching.get_act_patch_attn_head_out_by_pos(
            model, corrupted, stored, metric, progress=False
        )

    print("timing …", file=sys.stderr)
    seconds = interleaved_medians(
        {"tl": tl_sweep, "hooklab": end_to_end, "sweep": one_sweep, "forward": forward},
        runs=runs,
    )
    print("activation patching of the z grid …", file=sys.stderr)
    seconds |= interleaved_medians({"activation": activation}, runs=1, warmup=0)
    diff = max(float((results["hooklab"][g] - results["tl"][g]).abs().max()) for g in GRIDS)
    both, z_grid = "clean cache + z and resid_pre grids", "z grid (clean cache stored)"
    rows = [
        [both, "TL 3.9 local, hooks + backward", seconds["tl"], seconds["tl"], "-"],
        [both, "hooklab attribution", seconds["hooklab"], seconds["tl"], f"{diff:.1e}"],
        [z_grid, "hooklab attribution", seconds["sweep"], None, "-"],
        [z_grid, "hooklab activation patching", seconds["activation"], None, "-"],
        ["one remote forward", "hooklab", seconds["forward"], None, "-"],
    ]
    return [
        [what, who, f"{took:.3f}", "-" if tl_took is None else f"{tl_took / took:.2f}x",
         f"{took / seconds['forward']:.1f}", diff_text]
        for what, who, took, tl_took, diff_text in rows
    ]  # fmt: skip


if __name__ == "__main__":
    main()
