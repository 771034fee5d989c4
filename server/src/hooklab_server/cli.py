"""``hooklab-server``: load a model and serve it over HTTP. Every option is a setting
(settings.py): ``--max-specs 64`` or ``HOOKLAB_MAX_SPECS=64``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .auth import KeyRing, keys_main
from .settings import Settings, build_parser, is_loopback, is_wildcard, load_settings

if TYPE_CHECKING:
    from .engine import HookedTransformer

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
    from .api.serving import server_config

    configure_logging()
    log = logging.getLogger("hooklab_server")
    log.info("answering to hosts: %s", ", ".join(settings.open_hosts))
    if keys.enabled:
        log.info("API keys required (%d keys in %s)", len(keys.accounts()), settings.keys_file)
    elif settings.insecure_open and not is_loopback(settings.host):
        log.warning(
            "OPEN MODE on %s without API keys (--insecure-open): anyone who reaches this port "
            "can use the model and every stored object",
            settings.host,
        )
    if settings.redis_url:
        from .remote import scaled_out_app

        log.info(
            "scaled out: jobs, stored objects and quotas in Redis (prefix %r)",
            settings.redis_prefix,
        )
        app = scaled_out_app(settings, keys)
    else:
        from .api import create_app

        model = load_configured_model(settings, "hooklab-server")
        if model is None:
            return 2
        app = create_app(model, settings, keys=keys)
    import uvicorn

    # log_config=None: uvicorn's lines go through the handler above, request ids included.
    config = server_config(app, settings, log_config=None)
    uvicorn.Server(config).run()
    return 0


def configure_logging() -> None:
    from .api.edge import RequestIdFilter

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s [%(request_id)s] %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def load_configured_model(settings: Settings, program: str) -> HookedTransformer | None:
    """The model the settings name, on their device and dtype; None (said on stderr) when it
    cannot be loaded."""
    from .engine import load_model

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
        print(f"{program}: cannot load {settings.model!r}: {exc}", file=sys.stderr)
        return None
    if not attach_configured_saes(model, settings, program):
        return None
    cfg = model.cfg
    logging.getLogger("hooklab_server").info(
        "loaded %s in %.1f s: %d layers, d_model %d, %d hook points, %s on %s",
        settings.model, time.perf_counter() - started, cfg.n_layers, cfg.d_model,
        len(model.hook_names), settings.dtype, cfg.device,
    )  # fmt: skip
    if settings.compile:
        from .engine.compiled import enable_compile

        try:  # compiled for the decode pool the scheduler will make (its shapes); time logged
            enable_compile(model, settings.decode_rows, settings.decode_positions)
        except RuntimeError as exc:
            print(f"{program}: cannot compile {settings.model!r}: {exc}", file=sys.stderr)
            return None
    return model


def attach_configured_saes(model: HookedTransformer, settings: Settings, program: str) -> bool:
    """Attach the SAEs of ``--sae PATH@HOOK``; False (said on stderr) when one cannot be."""
    from .engine.saes import SaeLoadError, attach_sae, load_sae, parse_sae_flag

    for flag in settings.sae:
        try:
            path, hook = parse_sae_flag(flag)
            attach_sae(model, hook, load_sae(path, model.cfg.dtype, model.cfg.device))
        except (SaeLoadError, ValueError) as exc:
            print(f"{program}: cannot serve the SAE {flag!r}: {exc}", file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
