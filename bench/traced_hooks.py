"""Python hook functions in a patching sweep: traced (run on the server) vs callback (run here)
vs TransformerLens 3.9 local, on the same machine.

    .venv/bin/python bench/traced_hooks.py            # 18 tokens
    .venv/bin/python bench/traced_hooks.py --quick    # 8 tokens, 3 layers: a smoke test

The sweep is written as a TransformerLens user writes it, and runs unchanged on both models:

* ``transformer_lens.patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)``
  — TransformerLens's own loop: one ``run_with_hooks`` with a ``partial`` hook per (layer,
  position), then ``metric(logits).item()``;
* a hand loop over (layer, position) with ``partial(patch_position, pos=p)`` hooks that copy
  the clean cache entry in place, and the metric read with ``.item()``.

Candidates: TL local (the reference, under inference mode: its fastest); hooklab traced (the
default: the hook is a graph the server runs, the metric rides with the forward on the lazy
logits and one number comes back); hooklab traced with ``lazy_logits=False`` (the full logits
come back each time); hooklab callback (``hook_mode="callback"``: the server sends the activation
to this process at each firing and waits); ``hooklab.patching`` (the same call, batched on the
server, the Python metric traced). Per candidate: seconds, the ratio to TL, HTTP requests and
bytes per notebook step (one patched forward and its metric), and the largest difference from
TL's result. A gpt2-small-sized checkpoint (12 layers, d_model 768, vocab 50257, seeded random
weights) is served by ``hooklab-server`` in its own process on a loopback port.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformer_lens.patching as tl_patching
from _serving import SEED, served_beside_tl
from _table import print_table

import hooklab
from fixtures.checkpoints import GPT2_SMALL
from hooklab import patching
from hooklab.function_hooks import HooklabHookNotice

THREADS = 2
ANSWER, WRONG = 1234, 4321


def metric(logits: torch.Tensor) -> torch.Tensor:
    """A logit difference at the last position, as the notebooks write it."""
    return logits[0, -1, ANSWER] - logits[0, -1, WRONG]


def patch_position(resid: torch.Tensor, hook: Any, pos: int, clean: Any) -> torch.Tensor:
    resid[:, pos, :] = clean[hook.name][:, pos, :]
    return resid


def hand_loop(model: Any, corrupted: torch.Tensor, clean: Any, layers: int) -> torch.Tensor:
    positions = corrupted.shape[-1]
    out = torch.zeros(layers, positions)
    for layer in range(layers):
        for pos in range(positions):
            hook = partial(patch_position, pos=pos, clean=clean)
            logits = model.run_with_hooks(
                corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)]
            )
            out[layer, pos] = metric(logits).item()
    return out


class Traffic:
    """Counts the client's HTTP requests and the bytes sent and received (HTTP bodies, and the
    callback websocket's messages)."""

    def __init__(self, model: hooklab.HookedTransformer) -> None:
        self.model = model
        self.requests = 0
        self.sent = 0
        self.received = 0
        client = model._transport.client
        client.event_hooks["request"].append(self._request)
        client.event_hooks["response"].append(self._response)

    def _request(self, request: Any) -> None:
        self.requests += 1
        self.sent += len(request.content or b"")

    def _response(self, response: Any) -> None:
        self.received += int(response.headers.get("content-length", 0))

    def reset(self) -> tuple[int, int, int]:
        """(requests, bytes sent, bytes received) since the last reset, callback messages over
        the websocket included."""
        session = self.model._callbacks
        sent = self.sent + (session.bytes_sent if session else 0)
        received = self.received + (session.bytes_received if session else 0)
        counts = (self.requests, sent, received)
        self.requests = self.sent = self.received = 0
        if session:
            session.bytes_sent = session.bytes_received = 0
        return counts


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pos", type=int, default=18, help="prompt length (tokens)")
    parser.add_argument("--layers", type=int, default=12, help="layers the hand loop patches")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 3 layers")
    args = parser.parse_args()
    if args.quick:
        args.pos, args.layers = 8, 3
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(SEED)
    clean = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)
    corrupted = torch.randint(3, GPT2_SMALL["vocab_size"], (1, args.pos), generator=generator)
    with served_beside_tl(THREADS) as (model, tl):
        rows = run(model, tl, clean, corrupted, args)
    print(
        f"\nPython hooks in a patching sweep, gpt2-small-sized (12 layers, d_model 768), batch 1 x "
        f"{args.pos} tokens, CPU, {THREADS} threads, one timed run each; a step is one patched "
        "forward and its metric\n"
    )
    print_table(
        ["sweep", "candidate", "seconds", "TL / this", "requests/step", "bytes up/step",
         "bytes down/step", "max |diff| vs TL"],
        rows,
    )  # fmt: skip


def run(
    model: hooklab.HookedTransformer,
    tl: Any,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    args: argparse.Namespace,
) -> list[list[str]]:
    with torch.inference_mode():
        _, tl_cache = tl.run_with_cache(clean)
    _, cache = model.run_with_cache(clean, names_filter=lambda name: "resid_pre" in name)
    traffic = Traffic(model)
    sweeps: dict[str, Callable[[Any, Any], torch.Tensor]] = {
        "TL get_act_patch_resid_pre": lambda m, c: tl_patching.get_act_patch_resid_pre(
            m, corrupted, c, metric
        ),
        "hand loop, partial hook": lambda m, c: hand_loop(m, corrupted, c, args.layers),
    }
    table = []
    for sweep, call in sweeps.items():
        steps = (12 if sweep.startswith("TL") else args.layers) * args.pos
        print(f"{sweep}: TransformerLens …", file=sys.stderr)
        with torch.inference_mode():
            tl_seconds, expected = timed(partial(call, tl, tl_cache))
        table.append([sweep, "TL 3.9 local", f"{tl_seconds:.2f}", "1.0x", "-", "-", "-", "-"])
        candidates: list[tuple[str, str, bool]] = [
            ("hooklab traced", "auto", True),
            ("hooklab traced, eager logits", "auto", False),
            ("hooklab callback", "callback", False),
        ]
        for label, mode, lazy in candidates:
            print(f"{sweep}: {label} …", file=sys.stderr)
            model.hook_mode, model.lazy_logits = mode, lazy  # type: ignore[assignment]
            call(model, cache)  # warm-up (not timed): connections, the callback socket
            traffic.reset()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HooklabHookNotice)
                seconds, got = timed(partial(call, model, cache))
            requests, sent, received = traffic.reset()
            table.append([
                sweep, label, f"{seconds:.2f}", f"{tl_seconds / seconds:.2f}x",
                f"{requests / steps:.1f}", f"{sent / steps:,.0f}", f"{received / steps:,.0f}",
                f"{(got.cpu() - expected.cpu()).abs().max().item():.1e}",
            ])  # fmt: skip
        model.hook_mode, model.lazy_logits = "auto", True
    print("hooklab.patching (batched on the server) …", file=sys.stderr)
    patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    traffic.reset()
    seconds, got = timed(
        lambda: patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    )
    requests, sent, received = traffic.reset()
    steps = 12 * args.pos
    with torch.inference_mode():
        tl_seconds, expected = timed(
            lambda: tl_patching.get_act_patch_resid_pre(tl, corrupted, tl_cache, metric)
        )
    table.append([
        "hooklab.patching.get_act_patch_resid_pre", "batched, Python metric traced",
        f"{seconds:.2f}", f"{tl_seconds / seconds:.2f}x", f"{requests / steps:.2f}",
        f"{sent / steps:,.0f}", f"{received / steps:,.0f}",
        f"{(got.cpu() - expected.cpu()).abs().max().item():.1e}",
    ])  # fmt: skip
    return table


if __name__ == "__main__":
    main()
