"""Activation patching: hooklab (remote, loopback) vs TransformerLens 3.9 local, same machine.

    .venv/bin/python bench/patching.py              # 18 tokens, 3 hooklab runs, 1 TL run
    .venv/bin/python bench/patching.py --quick      # 2 layers of work fewer runs: smoke test
    .venv/bin/python bench/patching.py --pos 20 --runs 5 --tl-runs 2

A gpt2-small-sized checkpoint (12 layers, d_model 768, 12 heads, vocab 50257, seeded random
weights) is built into a temporary folder; ``hooklab-server --model <folder>`` serves it from a
separate process on a free loopback port, and this process loads the same checkpoint into
TransformerLens 3.9. Clean and corrupted prompts are seeded random token ids (batch 1).

Rows: ``get_act_patch_resid_pre`` (12 x pos patches) and ``get_act_patch_attn_head_out_all_pos``
(12 x 12 patches), each with

* TL local: ``transformer_lens.patching`` — one forward per patch (the reference);
* hooklab, server metric: ``hooklab.patching`` with ``metrics.logit_diff`` (computed on the
  server, one float per patch travels);
* hooklab, Python metric: the same with a plain Python callable (the server sends the logits at
  the last position per patch, the callable runs here).

The clean caches are made once beforehand (TL: ``run_with_cache``; hooklab: ``run_with_cache(...,
store=True)``, the stored-cache path) and are not timed. ``max |diff|`` compares each hooklab
result with TL's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformer_lens.patching as tl_patching
from _serving import SEED, served_beside_tl
from _table import median_seconds, print_table

import hooklab
from fixtures.checkpoints import GPT2_SMALL
from hooklab import metrics, patching

THREADS = 2
ANSWER, WRONG = 1234, 4321
FUNCTIONS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos")


def python_metric(logits: torch.Tensor) -> torch.Tensor:
    """What a TransformerLens notebook writes: a logit difference at the last position."""
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pos", type=int, default=18, help="prompt length (tokens)")
    parser.add_argument("--runs", type=int, default=3, help="timed hooklab runs (median)")
    parser.add_argument("--tl-runs", type=int, default=1, help="timed TL runs (median)")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 run each")
    args = parser.parse_args()
    if args.quick:
        args.pos, args.runs, args.tl_runs = 8, 1, 1
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    clean = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)
    corrupted = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)

    with served_beside_tl(THREADS) as (model, tl):
        rows = run(model, tl, clean, corrupted, args)
    print(
        f"\nactivation patching, gpt2-small-sized (12 layers, d_model 768), batch 1 x {args.pos} "
        f"tokens, CPU, {THREADS} threads; hooklab median of {args.runs}, TL of {args.tl_runs}\n"
    )
    print_table(["function", "candidate", "seconds", "TL / this", "max |diff| vs TL"], rows)


def run(
    model: hooklab.HookedTransformer,
    tl: object,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    args: argparse.Namespace,
) -> list[list[str]]:
    with torch.inference_mode():
        _, tl_cache = tl.run_with_cache(clean)  # type: ignore[attr-defined]
    _, cache = model.run_with_cache(
        clean, names_filter=lambda name: "resid_pre" in name or "hook_z" in name, store=True
    )
    server_metric = metrics.logit_diff(ANSWER, WRONG)
    table = []
    for name in FUNCTIONS:
        tl_function = getattr(tl_patching, name)
        ours = getattr(patching, name)
        print(f"{name}: TransformerLens …", file=sys.stderr)
        expected: list[torch.Tensor] = []
        with torch.inference_mode():  # TL's best case: no autograd graph per forward
            tl_seconds = median_seconds(
                lambda f=tl_function, out=expected: out.append(
                    f(tl, corrupted, tl_cache, python_metric).cpu()
                ),
                runs=args.tl_runs,
                warmup=0,
            )
        table.append([name, "TL 3.9 local", f"{tl_seconds:.2f}", "1.0x", "-"])
        for label, metric in (
            ("hooklab, server metric", server_metric),
            ("hooklab, Python metric", python_metric),
        ):
            print(f"{name}: {label} …", file=sys.stderr)
            got: list[torch.Tensor] = []
            seconds = median_seconds(
                lambda f=ours, m=metric, out=got: out.append(f(model, corrupted, cache, m)),
                runs=args.runs,
            )
            diff = (got[-1] - expected[-1]).abs().max().item()
            ratio = f"{tl_seconds / seconds:.1f}x"
            table.append([name, label, f"{seconds:.2f}", ratio, f"{diff:.1e}"])
    return table


if __name__ == "__main__":
    main()
