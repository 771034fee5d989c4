"""Generation: hooklab remote (loopback, HTTP hop included) vs TransformerLens 3.9 local vs
Hugging Face local, in tokens per second, same machine, same run.

    .venv/bin/python bench/generate.py            # 3 runs of each
    .venv/bin/python bench/generate.py --quick    # 1 run, 1 prompt only

A gpt2-small-sized checkpoint (seeded random weights), 64 new tokens, greedy, KV cache, for 1
prompt and 8 prompts, with and without a steering spec (a vector added to
``blocks.6.hook_resid_post`` at every step; TransformerLens gets the same hook function;
Hugging Face has no steering row). Targets: remote ≥ 2x TransformerLens and ≥ 0.8x Hugging
Face tokens/s. Candidates are timed round-robin; the table shows medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _serving import gpt2_small_checkpoint, interleaved_medians, running_server, wait_ready
from _table import print_table

import hooklab
from fixtures.oracle import load_hf_model, load_tl_model
from hooklab import hooks

NEW_TOKENS = 64
PROMPT_LENGTH = 16
STEER_AT = "blocks.6.hook_resid_post"


def candidates(
    remote: Any, tl: Any, hf: Any, prompts: torch.Tensor, vector: torch.Tensor | None
) -> dict[str, Any]:
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, stop_at_eos=False, verbose=False)
    specs = [(STEER_AT, hooks.steer(vector))] if vector is not None else []

    def steer(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x + vector

    def tl_generate() -> Any:
        with tl.hooks(fwd_hooks=[(STEER_AT, steer)] if vector is not None else []):
            return tl.generate(prompts, **greedy)

    def hf_generate() -> Any:
        with torch.inference_mode():
            return hf.generate(
                prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip

    rows = {
        "hooklab remote": lambda: remote.generate(prompts, fwd_hooks=specs, **greedy),
        "TransformerLens 3.9": tl_generate,
    }
    if vector is None:
        rows["Hugging Face"] = hf_generate
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    batches = (1,) if args.quick else (1, 8)
    torch.set_num_threads(1)  # the server process gets one thread too: a fair split of 2 cores
    warnings.filterwarnings("ignore")
    rows = []
    with gpt2_small_checkpoint() as checkpoint, tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "server.log"
        with running_server(checkpoint, log, threads=1) as (url, process):
            tl, hf = load_tl_model(checkpoint), load_hf_model(checkpoint)
            wait_ready(url, process, log)
            remote = hooklab.connect(url, timeout=600)
            generator = torch.Generator().manual_seed(0)
            vector = torch.randn(tl.cfg.d_model, generator=generator)
            for batch in batches:
                prompts = torch.randint(3, 1000, (batch, PROMPT_LENGTH), generator=generator)
                for steered in (False, True):
                    timings = interleaved_medians(
                        candidates(remote, tl, hf, prompts, vector if steered else None), runs
                    )
                    tokens = batch * NEW_TOKENS
                    reference = {name: tokens / seconds for name, seconds in timings.items()}
                    for name, seconds in timings.items():
                        rate = tokens / seconds
                        rows.append([
                            f"{batch}x{NEW_TOKENS}", "steer" if steered else "-", name,
                            f"{seconds:7.2f}", f"{rate:7.1f}",
                            f"{rate / reference['TransformerLens 3.9']:.2f}x",
                            f"{rate / reference['Hugging Face']:.2f}x"
                            if "Hugging Face" in reference else "-",
                        ])  # fmt: skip
    print(
        f"generate {NEW_TOKENS} new tokens after a {PROMPT_LENGTH}-token prompt, greedy, KV cache;"
    )
    print("gpt2-small-sized random checkpoint; 1 torch thread per process; medians")
    print("targets: hooklab remote >= 2x TransformerLens and >= 0.8x Hugging Face tokens/s")
    print_table(["prompts", "hook", "candidate", "s", "tok/s", "vs TL", "vs HF"], rows)


if __name__ == "__main__":
    main()
