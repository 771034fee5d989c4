"""CUDA check of the engine against Hugging Face on the same weights: dtypes, SDPA, memory, speed.

    python bench/gpu_check.py            (needs a CUDA device; run from the repository root)

Builds a gpt2-small-sized and a Llama-GQA checkpoint with seeded random weights, then for fp32,
fp16 and bf16 compares engine and HF logits / log-probs, checks that the engine's default path
runs on the flash SDPA kernel, that the explicit-softmax path agrees with it, and prints forward,
full-cache and generation timings and peak memory as ratios to HF measured in the same run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server" / "src"), str(ROOT / "tests"), str(Path(__file__).parent)]
from _table import print_table  # noqa: E402

from fixtures.checkpoints import GPT2_SMALL, build_checkpoint, build_tokenizer  # noqa: E402
from hooklab_server.engine import load_model  # noqa: E402

LLAMA_MID = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    max_position_embeddings=1024,
)
DEVICE = "cpu" if "--cpu-smoke" in sys.argv else "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_time(fn, runs: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def check(name: str, checkpoint: Path, rows: list[list[str]], perf: list[list[str]]) -> None:
    for label, dtype in DTYPES.items():
        check_dtype(name, checkpoint, label, dtype, rows, perf)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def check_dtype(
    name: str,
    checkpoint: Path,
    label: str,
    dtype: torch.dtype,
    rows: list[list[str]],
    perf: list[list[str]],
) -> None:
    no_processing = dict(
        fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    ours = load_model(checkpoint, device=DEVICE, dtype=dtype, **no_processing)
    processed = load_model(checkpoint, device=DEVICE, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(DEVICE).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (8, 128), generator=generator).to(DEVICE)
    every_pattern = [(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)]
    with torch.inference_mode():
        ref = hf(tokens).logits.float()
        mine = ours(tokens).float()
        explicit = ours.run_with_hooks(tokens, fwd_hooks=every_pattern).float()
        logprobs = processed(tokens).float().log_softmax(-1)
        logprob_gap = (logprobs - ref.log_softmax(-1)).abs().max().item()
    rows.append(
        [
            name,
            label,
            f"{(mine - ref).abs().max().item():.2e}",
            f"{logprob_gap:.2e}",
            fused_kernel_gap(ours, tokens, mine, dtype),
            f"{(explicit - mine).abs().max().item():.2e}",
            f"{ref.abs().max().item():.1f}",
        ]
    )
    if label == "fp32" or DEVICE != "cuda":
        return
    forward_engine = cuda_time(lambda: ours(tokens))
    with torch.inference_mode():
        forward_hf = cuda_time(lambda: hf(tokens).logits)
        mem_hf = peak_bytes(lambda: hf(tokens).logits)
        prompt = tokens[:, :16]
        gen_hf = cuda_time(
            lambda: hf.generate(
                prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
            ),
            runs=3,
        )
    cached = cuda_time(lambda: ours.run_with_cache(tokens), runs=5)
    mem_engine = peak_bytes(lambda: ours(tokens))
    mem_cache = peak_bytes(lambda: ours.run_with_cache(tokens))
    gen_engine = cuda_time(
        lambda: ours.generate(prompt, max_new_tokens=64, do_sample=False, stop_at_eos=False), runs=3
    )
    perf.append(
        [
            name,
            label,
            f"{forward_engine * 1e3:.2f}",
            f"{forward_hf * 1e3:.2f}",
            f"{forward_engine / forward_hf:.2f}x",
            f"{cached * 1e3:.1f}",
            f"{mem_engine / 2**20:.0f}/{mem_hf / 2**20:.0f}",
            f"{mem_cache / 2**20:.0f}",
            f"{8 * 64 / gen_engine:.0f}",
            f"{8 * 64 / gen_hf:.0f}",
            f"{gen_hf / gen_engine:.2f}x",
        ]
    )


def fused_kernel_gap(model, tokens: torch.Tensor, default: torch.Tensor, dtype: torch.dtype) -> str:
    """The default path's logits against a forced fused SDPA kernel (or why none applies)."""
    if DEVICE != "cuda":
        return "n/a"
    fp32 = dtype == torch.float32
    backend = SDPBackend.EFFICIENT_ATTENTION if fp32 else SDPBackend.FLASH_ATTENTION
    try:
        with sdpa_kernel(backend), torch.inference_mode():
            fused = model(tokens).float()
    except RuntimeError as exc:
        return f"unavailable: {str(exc).splitlines()[0][:60]}"
    return f"{(fused - default).abs().max().item():.2e} ({backend.name})"


def main() -> None:
    if DEVICE == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device (or pass --cpu-smoke)"
        print(torch.__version__, torch.cuda.get_device_name(0))
    tmp = Path(tempfile.mkdtemp())
    tokenizer = tmp / "tok"
    build_tokenizer(tokenizer)
    big = DEVICE == "cuda"
    models = {
        "gpt2-small": build_checkpoint(
            "gpt2", tmp / "ckpt-a", tokenizer_dir=tokenizer, **(GPT2_SMALL if big else {})
        ),
        "llama-gqa-mid": build_checkpoint(
            "llama", tmp / "ckpt-b", tokenizer_dir=tokenizer, **(LLAMA_MID if big else {})
        ),
    }
    rows: list[list[str]] = []
    perf: list[list[str]] = []
    for name, path in models.items():
        check(name, path, rows, perf)
    print("\nagreement, batch 8x128 (max abs differences)")
    print_table(
        [
            "model",
            "dtype",
            "logits vs HF",
            "processed logprobs vs HF",
            "flash/efficient SDPA vs default",
            "explicit vs SDPA",
            "max |logit|",
        ],
        rows,
    )
    print("\nspeed and memory, batch 8x128, generate 8 prompts x 64 new tokens (greedy, KV cache)")
    print_table(
        [
            "model",
            "dtype",
            "engine fwd ms",
            "HF fwd ms",
            "fwd ratio",
            "full cache ms",
            "peak MiB engine/HF",
            "peak MiB cache",
            "engine tok/s",
            "HF tok/s",
            "gen speed vs HF",
        ],
        perf,
    )


if __name__ == "__main__":
    main()
