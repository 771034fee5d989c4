"""Remote ``run_with_cache`` over loopback vs TransformerLens 3.9 local, same machine, same run.

    .venv/bin/python bench/remote.py                  # 1x128 and 8x128, 5 runs
    .venv/bin/python bench/remote.py --quick          # smoke run: 1x128 only, 2 runs
    .venv/bin/python bench/remote.py --runs 9

A gpt2-small-sized checkpoint (12 layers, d_model 768, vocab 50257, seeded random weights) is
built into a temporary folder. ``hooklab-server --model <folder>`` serves it from a separate
process (a real uvicorn on a free loopback port, so server encode and client decode do not share
one GIL); this process connects with ``hooklab.connect(url)`` and also loads the same checkpoint
into TransformerLens 3.9 (``load_tl_model``, TransformerLens's default processing).

Rows, per batch (1x128 and 8x128 random token ids, seeded) — every hook point that fires, plus
the logits, exactly what a TransformerLens user gets from ``run_with_cache(tokens)``:

* TL local: ``HookedTransformer.run_with_cache`` under ``torch.inference_mode()`` (reference);
* remote run_with_cache: ``model.run_with_cache(tokens)`` through the hooklab client — the
  ratio to TL (target ≤ 1.5x) and the client-side throughput, bytes of tensors decoded / wall
  time of the call (target ≥ 0.8 GB/s). The call is also split at the moment the response
  headers arrive (an httpx response event hook): before it the server computes and prepares
  the frames; after it the body streams and the client decodes it ("streaming phase");
* remote run_with_cache over httpx's transport: the same call from a second client made with
  ``HOOKLAB_HTTP_TRANSPORT=httpx`` (httpx's chunks fed to the frame decoder, one more copy per
  byte than the default socket transport's reads straight into frame buffers), split alike;
* remote forward: ``model.forward(tokens, return_type="loss")`` — the server's forward pass
  with no hooks (unembed included) plus one HTTP round trip, a scalar to transfer;

and, to show where the remote time goes (breakdown rows, no targets):

* server run_with_cache, nothing sent: the same request with ``return_cache=false`` and
  ``return_type="loss"`` — the server's forward with every hook captured, a scalar response
  (the loss adds a log-softmax over the logits);
* raw httpx read: the identical request through a plain ``httpx.Client`` stream, every byte of
  the response read with ``iter_raw()`` and thrown away (server compute + encode + transfer +
  httpx, no frame decoding); also split at the first body chunk;
* curl read: the same with ``curl -o /dev/null`` (a non-Python client: the server's ceiling),
  split at curl's ``time_starttransfer``;
* client decode, offline: the client's own frame decoder (``hooklab._transport._read_frames``)
  fed one captured response as fresh 64 KiB ``bytes`` chunks, the sizes httpx delivered — no
  socket (decode cost alone). The chunks are cut from one stored copy as they are fed, the way
  httpcore allocates one per ``recv``: holding ~20,000 separate chunks of an 8x128 response
  fragments the malloc heap and made the same decoding 3-4x slower (more page faults).

TL and the server use the same number of torch threads (``--threads``; the server gets
``OMP_NUM_THREADS``). The default is 1: on this 2-core machine, shared with other work, two
OpenMP threads per process stall at random (the same call took 0.3 s to 10 s), while one thread
gives steady timings; use ``--threads 2`` on an otherwise idle machine. Fewer threads make the
compute slower on both sides, so the remote/TL ratio is somewhat kinder at 1 thread than it
would be at 2 on an idle machine: the split rows show the transfer part in absolute terms.

Measurements are interleaved: every repetition times each candidate once, in an order that
rotates between repetitions, so that noise from other work on the machine hits all candidates
alike; the table shows medians. GB/s is 10^9 bytes per second.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _serving import (  # noqa: E402
    SEED,
    gpt2_small_checkpoint,
    interleaved_medians,
    running_server,
    wait_ready,
)
from _table import print_table  # noqa: E402

import hooklab  # noqa: E402
from fixtures.oracle import load_tl_model  # noqa: E402
from hooklab._transport import HTTP_TRANSPORT_ENV, _read_frames  # noqa: E402
from hooklab_proto import FRAMES_MEDIA_TYPE  # noqa: E402

THREADS = 1
SEQ = 128
BATCHES = (1, 8)
FIRST_ID = 3  # the fixture tokenizer's special tokens are ids 0..2: draw prompt ids above them
REQUEST_TIMEOUT_S = 300.0

# Targets of the remote-cache performance issue.
TARGET_RATIO_VS_TL = 1.5  # remote run_with_cache time / TL local run_with_cache time
TARGET_GBPS = 0.8  # tensor bytes decoded by the client / remote call time


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


class _StoredResponse:
    """Just enough of an ``httpx.Response`` for the client's frame decoder: replays a stored body
    as fresh ``bytes`` chunks of ``chunk_size``, allocated one by one as httpcore does."""

    def __init__(self, body: bytes, chunk_size: int) -> None:
        self._body = body
        self._chunk_size = chunk_size
        self.headers = {"content-length": str(len(body))}
        self.extensions: dict[str, object] = {}  # no socket to read in place: chunks are fed

    def iter_raw(self) -> Iterator[bytes]:
        view = memoryview(self._body)
        for start in range(0, view.nbytes, self._chunk_size):
            yield bytes(view[start : start + self._chunk_size])


class Splits:
    """Per-call (before, after) split of a candidate's time, recorded by the candidate itself;
    ``medians(runs)`` looks at the last ``runs`` calls only (the timed ones, after warm-up)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    def add(self, before: float, after: float) -> None:
        self.before.append(before)
        self.after.append(after)

    def medians(self, runs: int) -> tuple[float, float]:
        return statistics.median(self.before[-runs:]), statistics.median(self.after[-runs:])


def raw_read(
    client: httpx.Client, body: bytes, keep: bool = False, splits: Splits | None = None
) -> tuple[int, list[bytes], dict[str, str]]:
    """POST the run_with_cache request and read the whole response body without decoding it
    (``keep``: also return the chunks)."""
    chunks: list[bytes] = []
    received = 0
    start = time.perf_counter()
    first = None
    with client.stream(
        "POST",
        "/v1/run_with_cache",
        content=body,
        headers={"content-type": "application/json", "accept": FRAMES_MEDIA_TYPE},
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            if first is None:
                first = time.perf_counter()
            received += len(chunk)
            if keep:
                chunks.append(chunk)
        headers = dict(response.headers)
    end = time.perf_counter()
    if splits is not None and first is not None:
        splits.add(first - start, end - first)
    return received, chunks, headers


def curl_read(url: str, body_path: Path, splits: Splits) -> None:
    out = subprocess.run(
        [
            "curl", "-sS", "--fail", "-o", "/dev/null", "-X", "POST",
            "-H", "content-type: application/json", "-H", f"accept: {FRAMES_MEDIA_TYPE}",
            "-w", "%{time_starttransfer} %{time_total}",
            "--data-binary", f"@{body_path}", f"{url}/v1/run_with_cache",
        ],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    first, total = map(float, out.split())
    splits.add(first, total - first)


def connect_over_httpx(url: str) -> Any:
    """A client on httpx's own transport (the client's escape hatch), for comparison."""
    previous = os.environ.get(HTTP_TRANSPORT_ENV)
    os.environ[HTTP_TRANSPORT_ENV] = "httpx"
    try:
        return hooklab.connect(url, timeout=REQUEST_TIMEOUT_S)
    finally:
        if previous is None:
            del os.environ[HTTP_TRANSPORT_ENV]
        else:
            os.environ[HTTP_TRANSPORT_ENV] = previous


def split_cache_call(model: Any, tokens: torch.Tensor, splits: Splits) -> Callable[[], None]:
    """``model.run_with_cache(tokens)`` (the whole cache brought here), split at the moment
    the response headers arrive."""
    headers_at: list[float] = []
    model._transport.client.event_hooks = {
        "response": [lambda response: headers_at.append(time.perf_counter())]
    }

    def call() -> None:
        headers_at.clear()
        start = time.perf_counter()
        model.run_with_cache(tokens, lazy=False)
        end = time.perf_counter()
        splits.add(headers_at[0] - start, end - headers_at[0])

    return call


def candidates_for(
    remote: Any, remote_httpx: Any, tl: Any, raw_client: httpx.Client, url: str,
    tokens: torch.Tensor, body: bytes, body_path: Path, captured: _StoredResponse,
    splits: dict[str, Splits],
) -> dict[str, Callable[[], object]]:  # fmt: skip
    def tl_local() -> None:
        with torch.inference_mode():
            tl.run_with_cache(tokens)

    def remote_forward() -> None:
        remote.forward(tokens, return_type="loss")

    def server_cache_only() -> None:
        remote._transport.frames(
            "POST", "/v1/run_with_cache",
            {"input": tokens, "return_type": "loss", "return_cache": False}, progress=False,
        )  # fmt: skip

    def httpx_raw() -> None:
        raw_read(raw_client, body, splits=splits["httpx_raw"])

    def curl() -> None:
        curl_read(url, body_path, splits["curl"])

    def decode_offline() -> None:
        _read_frames(captured, progress=False)  # type: ignore[arg-type]

    candidates = {
        "tl": tl_local,
        "remote": split_cache_call(remote, tokens, splits["remote"]),
        "remote_httpx": split_cache_call(remote_httpx, tokens, splits["remote_httpx"]),
        "forward": remote_forward,
        "server_cache": server_cache_only,
        "httpx_raw": httpx_raw,
        "decode": decode_offline,
    }
    if shutil.which("curl"):
        candidates["curl"] = curl
    return candidates


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_same_model(remote: Any, tl: Any, tokens: torch.Tensor) -> tuple[int, str]:
    """Compare one remote and one local run_with_cache; returns (tensor bytes decoded, summary)."""
    logits, cache = remote.run_with_cache(tokens, lazy=False)
    with torch.inference_mode():
        tl_logits, tl_cache = tl.run_with_cache(tokens)
    tensor_bytes = logits.nbytes + sum(t.nbytes for t in cache.values())
    tl_bytes = tl_logits.nbytes + sum(t.nbytes for t in tl_cache.values())
    remote_keys, tl_keys = set(cache.keys()), set(tl_cache.keys())
    lp = (logits.log_softmax(-1) - tl_logits.log_softmax(-1)).abs().max().item()
    last = f"blocks.{tl.cfg.n_layers - 1}.hook_resid_post"
    resid = (cache[last] - tl_cache[last]).abs().max().item()
    summary = (
        f"{len(remote_keys)} remote tensors + logits ({tensor_bytes / 1e6:.1f} MB) vs "
        f"{len(tl_keys)} TL ({tl_bytes / 1e6:.1f} MB); max |Δ log-prob| {lp:.1e}, "
        f"max |Δ {last}| {resid:.1e}"
    )
    if remote_keys != tl_keys:
        summary += (
            f"; only remote: {sorted(remote_keys - tl_keys)[:5]}, "
            f"only TL: {sorted(tl_keys - remote_keys)[:5]}"
        )
    return tensor_bytes, summary


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

HEADERS = ["batch", "measurement", "median", "bytes", "GB/s", "vs TL", "target", "met"]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}"


def vs(seconds: float, reference: float) -> str:
    return f"{seconds / reference:.2f}x"


def bench_batch(
    remote: Any, remote_httpx: Any, tl: Any, raw_client: httpx.Client, url: str, batch: int,
    runs: int, tmp: Path, generator: torch.Generator,
) -> list[list[str]]:  # fmt: skip
    label = f"{batch}x{SEQ}"
    vocab = min(tl.cfg.d_vocab, remote.cfg.d_vocab)
    tokens = torch.randint(FIRST_ID, vocab, (batch, SEQ), generator=generator)
    tensor_bytes, summary = check_same_model(remote, tl, tokens)
    print(f"[{label}] sanity: {summary}", flush=True)
    gc.collect()

    body = httpx.Request("POST", url, json={"input": tokens.tolist()}).read()
    body_path = tmp / f"body-{batch}.json"
    body_path.write_bytes(body)
    received, chunks, headers = raw_read(raw_client, body, keep=True)
    declared = headers.get("content-length")  # none: streamed while the forward ran
    if declared is not None and int(declared) != received:
        raise AssertionError(f"read {received} bytes, Content-Length says {declared}")
    sizes = sorted(len(c) for c in chunks)
    print(f"[{label}] response: {received} bytes in {len(chunks)} chunks from iter_raw "
          f"(median {sizes[len(sizes) // 2]} B, max {sizes[-1]} B)", flush=True)  # fmt: skip
    captured = _StoredResponse(b"".join(chunks), chunk_size=sizes[-1])
    del chunks
    gc.collect()

    splits = {name: Splits() for name in ("remote", "remote_httpx", "httpx_raw", "curl")}
    candidates = candidates_for(
        remote, remote_httpx, tl, raw_client, url, tokens, body, body_path, captured, splits
    )
    print(f"[{label}] timing {', '.join(candidates)} ({runs} interleaved runs) …", flush=True)
    t = interleaved_medians(candidates, runs)
    remote._transport.client.event_hooks = {}
    remote_httpx._transport.client.event_hooks = {}
    del captured
    gc.collect()

    ratio = t["remote"] / t["tl"]
    rate = tensor_bytes / t["remote"] / 1e9
    before, after = splits["remote"].medians(runs)
    rows = [
        [label, "TL local run_with_cache (reference)", ms(t["tl"]), mb(tensor_bytes), "-",
         "1.00x", "-", "-"],
        [label, "remote run_with_cache, full cache (time)", ms(t["remote"]), mb(received),
         gbps(tensor_bytes, t["remote"]), vs(t["remote"], t["tl"]), f"≤ {TARGET_RATIO_VS_TL}x TL",
         "yes" if ratio <= TARGET_RATIO_VS_TL else "NO"],
        [label, "remote run_with_cache, client throughput", ms(t["remote"]), mb(tensor_bytes),
         f"{rate:.2f}", vs(t["remote"], t["tl"]), f"≥ {TARGET_GBPS} GB/s",
         "yes" if rate >= TARGET_GBPS else "NO"],
        [label, "  split: request → response headers", ms(before), "-", "-", vs(before, t["tl"]),
         "-", "-"],
        [label, "  split: headers → cache decoded (streaming)", ms(after), mb(tensor_bytes),
         gbps(tensor_bytes, after), "-", "-", "-"],
    ]  # fmt: skip
    before, after = splits["remote_httpx"].medians(runs)
    rows += [
        [label, "remote run_with_cache over httpx's transport", ms(t["remote_httpx"]),
         mb(tensor_bytes), gbps(tensor_bytes, t["remote_httpx"]), vs(t["remote_httpx"], t["tl"]),
         "-", "-"],
        [label, "  split: request → response headers", ms(before), "-", "-", vs(before, t["tl"]),
         "-", "-"],
        [label, "  split: headers → cache decoded (streaming)", ms(after), mb(tensor_bytes),
         gbps(tensor_bytes, after), "-", "-", "-"],
        [label, "remote forward, loss only (server forward-only)", ms(t["forward"]), "-", "-",
         vs(t["forward"], t["tl"]), "-", "-"],
        [label, "breakdown: server run_with_cache, nothing sent", ms(t["server_cache"]), "-", "-",
         vs(t["server_cache"], t["tl"]), "-", "-"],
    ]  # fmt: skip
    for name, what in (
        ("httpx_raw", "raw httpx read, no decode"),
        ("curl", "curl read, no decode"),
    ):
        if name not in t:
            continue
        before, after = splits[name].medians(runs)
        rows += [
            [label, f"breakdown: {what}", ms(t[name]), mb(received), gbps(received, t[name]),
             vs(t[name], t["tl"]), "-", "-"],
            [label, "  split: request → first body byte", ms(before), "-", "-",
             vs(before, t["tl"]), "-", "-"],
            [label, "  split: first → last body byte", ms(after), mb(received),
             gbps(received, after), "-", "-", "-"],
        ]  # fmt: skip
    rows.append([
        label, "breakdown: client decode only, offline", ms(t["decode"]), mb(received),
        gbps(received, t["decode"]), "-", "-", "-",
    ])  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1x128 only, 2 runs")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed repetitions per row (default 5)"
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS,
        help="torch threads for TL and for the server process (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    batches = (1,) if args.quick else BATCHES

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} torch thread(s) for TL and the server, "
          f"fp32, CPU, {os.cpu_count()} cores; medians of {runs} interleaved runs after 1 "
          f"warm-up round; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    bench_start = time.perf_counter()
    rows: list[list[str]] = []
    with gpt2_small_checkpoint() as checkpoint:
        tmp = checkpoint.parent
        log_path = tmp / "server.log"
        print(f"checkpoint built in {time.perf_counter() - bench_start:.0f} s; starting "
              f"hooklab-server and loading TL …", flush=True)  # fmt: skip
        with running_server(checkpoint, log_path, args.threads) as (url, process):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tl = load_tl_model(checkpoint)  # TL's default processing, as from_pretrained
            wait_ready(url, process, log_path)
            print(f"server at {url} ready, TL loaded, in {time.perf_counter() - start:.0f} s",
                  flush=True)  # fmt: skip
            remote = hooklab.connect(url, timeout=REQUEST_TIMEOUT_S)
            remote_httpx = connect_over_httpx(url)
            raw_client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)
            generator = torch.Generator().manual_seed(SEED)
            try:
                for batch in batches:
                    rows += bench_batch(
                        remote, remote_httpx, tl, raw_client, url, batch, runs, tmp, generator
                    )
            finally:
                raw_client.close()
                remote.close()
                remote_httpx.close()

    print()
    print_table(HEADERS, rows)
    print()
    print(
        "median: wall time of one call (split rows: medians of each part); bytes: response "
        "body (Content-Length) on wire rows, tensor bytes (logits + cache) on the TL, "
        "throughput and streaming rows; GB/s: those bytes / median; vs TL: median / TL's."
    )
    print(
        "Breakdown rows send the same request but skip the client's frame decoding (raw httpx, "
        "curl), send nothing back (server run_with_cache: return_cache=false, "
        "return_type='loss'), or skip the socket (client decode of one captured response)."
    )
    print(f"total {time.perf_counter() - bench_start:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
