"""A notebook's workflow over the network: hooklab remote (lazy cache, analysis on the server)
vs TransformerLens 3.9 local, over loopback and through a slower link, in one run.

    .venv/bin/python bench/notebook.py              # 8x128 tokens, median of 3
    .venv/bin/python bench/notebook.py --quick      # 1x32, one run: smoke test

A gpt2-small-sized checkpoint (12 layers, d_model 768, 12 heads, vocab 50257, seeded random
weights) served by ``hooklab-server`` in its own process; TransformerLens here on the same
weights. The workflow, the same code for both (the model is the only difference):

    logits, cache = model.run_with_cache(tokens)            # every hook point
    cache.accumulated_resid(apply_ln=True, pos_slice=-1)    # logit lens
    cache.logit_attrs(cache.decompose_resid(apply_ln=True, pos_slice=-1), ...)    # per layer
    cache.logit_attrs(cache.stack_head_results(apply_ln=True, pos_slice=-1), ...) # per head
    cache["pattern", 3][0, 5], cache["pattern", 9][1, 2]    # two attention patterns
    cache["resid_post", 6][:, -1]                           # one residual slice

hooklab runs it with the cache on the server (``lazy=True``, what the default rule picks for a
cache this size: the analysis runs there, two patterns and a residual travel), and with
``lazy=False`` (the whole cache comes here) for comparison. Links: loopback; a proxy on
loopback limited to ~1 Gb/s with 1 ms of one-way latency; and ~100 Mb/s with 5 ms
(``bench/_proxy.py``). "MB moved" counts the response bytes the client read. Targets: <= 1.2x
TL local on loopback, <= 2x at 1 Gb/s, bytes moved <= 5% of the eager cache's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _proxy import throttled
from _serving import SEED, server_beside_tl
from _table import median_seconds, print_table

import hooklab
from fixtures.checkpoints import GPT2_SMALL

THREADS = 1
ANSWER, WRONG = 1234, 4321
LINKS = {"1 Gb/s, 1 ms": (125e6, 0.001), "100 Mb/s, 5 ms": (12.5e6, 0.005)}


def workflow(model: Any, tokens: torch.Tensor, **cache_options: Any) -> list[torch.Tensor]:
    """What the notebook computes: the same calls on TransformerLens and on hooklab."""
    _, cache = model.run_with_cache(tokens, **cache_options)
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    layers = cache.decompose_resid(apply_ln=True, pos_slice=-1)
    layer_dla = cache.logit_attrs(layers, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1)
    heads = cache.stack_head_results(apply_ln=True, pos_slice=-1)
    head_dla = cache.logit_attrs(heads, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1)
    patterns = [cache["pattern", 3][0, 5], cache["pattern", 9][-1, 2]]
    resid = cache["resid_post", 6][:, -1]
    return [lens, layer_dla, head_dla, *patterns, resid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.pos, args.runs = 1, 32, 1
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(3, GPT2_SMALL["vocab_size"], (args.batch, args.pos), generator=generator)
    with server_beside_tl(THREADS) as (url, tl):
        rows = run(url, tl, tokens, args.runs)
    print(
        f"\nnotebook workflow, gpt2-small-sized, {args.batch}x{args.pos} tokens, CPU, "
        f"{THREADS} thread(s) each side, median of {args.runs}\n"
    )
    print_table(["link", "candidate", "seconds", "vs TL local", "MB moved", "max |diff|"], rows)


def run(url: str, tl: Any, tokens: torch.Tensor, runs: int) -> list[list[str]]:
    with torch.inference_mode():
        expected = workflow(tl, tokens)
        tl_seconds = median_seconds(lambda: workflow(tl, tokens), runs, warmup=0)
    rows = [["local", "TransformerLens 3.9", f"{tl_seconds:.2f}", "1.00x", "-", "-"]]

    def measure(link: str, target: str, label: str, **options: Any) -> None:
        print(f"{link}: {label} …", file=sys.stderr)
        model = hooklab.connect(target, timeout=600)
        try:
            got = workflow(model, tokens, **options)  # warm-up, and the values compared
            before = model._transport.received_bytes
            seconds = median_seconds(lambda: workflow(model, tokens, **options), runs, warmup=0)
            moved = (model._transport.received_bytes - before) / runs
        finally:
            model.close()
        diff = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
        rows.append(
            [link, label, f"{seconds:.2f}", f"{seconds / tl_seconds:.2f}x", f"{moved / 1e6:.1f}",
             f"{diff:.1e}"]
        )  # fmt: skip

    measure("loopback", url, "hooklab, cache on the server", lazy=True)
    measure("loopback", url, "hooklab, whole cache here", lazy=False)
    port = int(url.rsplit(":", 1)[1])
    for link, (rate, latency) in LINKS.items():
        with throttled(port, rate, latency) as slow_url:
            measure(link, slow_url, "hooklab, cache on the server", lazy=True)
            if rate >= 100e6:
                measure(link, slow_url, "hooklab, whole cache here", lazy=False)
    return rows


if __name__ == "__main__":
    main()
