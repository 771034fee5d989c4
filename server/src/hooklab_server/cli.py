"""``hooklab-server``: load a model and serve it over HTTP. Every option is a setting
(settings.py): ``--max-specs 64`` or ``HOOKLAB_MAX_SPECS=64``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

import torch

from .auth import KeyRing, keys_main
from .settings import build_parser, is_loopback, is_wildcard, load_settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:  # hooklab-server keys add|list|revoke …
        defaults = load_settings([])
        return keys_main(argv[1:], defaults.keys_file, list(defaults.quotas()))
    parser = build_parser(
        "hooklab-server",
        "Serve a hooked transformer over HTTP (TransformerLens-style API). "
        "'hooklab-server keys --help' manages API keys.",
    )
    settings = load_settings(argv, parser=parser)
    if is_wildcard(settings.host) and not settings.allowed_hosts:
        parser.error(
            f"--host {settings.host} answers on every interface: name the host names clients "
            "use with --allowed-hosts (e.g. --allowed-hosts gpu-box,10.0.0.5, or '*' for any)"
        )
    keys = KeyRing(settings.keys_file, settings.quotas())
    if not keys.enabled and not is_loopback(settings.host) and not settings.insecure_open:
        parser.error(
            f"no API keys are configured and --host {settings.host} is not a loopback address: "
            "add keys ('hooklab-server keys add NAME' with --keys-file), or pass --insecure-open "
            "to serve anyone who can reach it"
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
    if keys.enabled:
        log.info("API keys required (%d keys in %s)", len(keys.accounts()), settings.keys_file)
    elif settings.insecure_open and not is_loopback(settings.host):
        log.warning(
            "OPEN MODE on %s without API keys (--insecure-open): anyone who reaches this port "
            "can use the model and every stored object",
            settings.host,
        )
    import uvicorn

    # log_config=None: uvicorn's lines go through the handler above, request ids included.
    config = server_config(create_app(model, settings, keys=keys), settings, log_config=None)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
