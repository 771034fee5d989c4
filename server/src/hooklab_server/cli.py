"""``hooklab-server``: load a model and serve it over HTTP. Every option is a setting
(settings.py): ``--max-specs 64`` or ``HOOKLAB_MAX_SPECS=64``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import torch

from .settings import build_parser, is_wildcard, load_settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "hooklab-server",
        "Serve a hooked transformer over HTTP (TransformerLens-style API).",
    )
    settings = load_settings(argv, parser=parser)
    if is_wildcard(settings.host) and not settings.allowed_hosts:
        parser.error(
            f"--host {settings.host} answers on every interface: name the host names clients "
            "use with --allowed-hosts (e.g. --allowed-hosts gpu-box,10.0.0.5, or '*' for any)"
        )
    from .api import create_app
    from .api.edge import RequestIdFilter
    from .api.serving import server_config
    from .engine import load_model

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s [%(request_id)s] %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    log = logging.getLogger("hooklab_server")

    started = time.perf_counter()
    processing = settings.processing
    try:
        model = load_model(
            settings.model,
            device=settings.device,
            dtype=DTYPES[settings.dtype],
            fold_ln=processing,
            center_writing_weights=processing,
            center_unembed=processing,
            fold_value_biases=processing,
        )
    except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        print(f"hooklab-server: cannot load {settings.model!r}: {exc}", file=sys.stderr)
        return 2
    cfg = model.cfg
    log.info(
        "loaded %s in %.1f s: %d layers, d_model %d, %d hook points, %s on %s",
        settings.model, time.perf_counter() - started, cfg.n_layers, cfg.d_model,
        len(model.hook_names), settings.dtype, cfg.device,
    )  # fmt: skip
    log.info("answering to hosts: %s", ", ".join(settings.open_hosts))
    import uvicorn

    # log_config=None: uvicorn's lines go through the handler above, request ids included.
    config = server_config(create_app(model, settings), settings, log_config=None)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
