"""The engine cache: the verified engine directory for (model, build options), built once, safe across processes.

``$OPTIMUM_NVIDIA_CACHE/engines/<key>/``, where the key hashes the manifest's identity (build/engine_dir.py). The
builders of one key take its lock (cache_dir.py); an entry that fails verification is rebuilt, never loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from optimum_nvidia_core import cache_dir
from optimum_nvidia_core.build import engine_dir
from optimum_nvidia_core.build.builder import build_fp8_engine, prepare_build

logger = logging.getLogger(__name__)


def engine_cache_root() -> Path:
    """<project cache>/engines."""
    return cache_dir.cache_root() / "engines"


def get_or_build(model_dir: Path, config, build_fn: Callable | None = None, cache_root: Path | None = None) -> Path:
    """The verified engine dir for (model_dir, config), building it once if needed. Safe across processes.

    ``build_fn(model_dir, config, out_dir)`` writes a complete engine (weights, tokenizer, manifest via
    ``save_engine``) into ``out_dir``; default ``build_fp8_engine``. The ``config`` it receives has its calibration
    data already materialized as a list, so an iterator given by the user is read only once.
    """
    build_fn = build_fn or build_fp8_engine
    prepare = prepare_build
    if getattr(config, "quantization", None) == "int4":  # INT4 weights: their own recipe and manifest
        from optimum_nvidia_core.build.int4_build import prepare_int4_build as prepare
    config, manifest = prepare(Path(model_dir), config)
    key = engine_dir.cache_key(manifest["identity"])
    root = Path(cache_root) if cache_root is not None else engine_cache_root()
    final_dir = root / key
    with cache_dir.build_lock(final_dir):
        try:
            engine_dir.verify_engine_dir(final_dir, expected_key=key)
            return final_dir
        except engine_dir.EngineDirError as exc:
            if final_dir.exists():
                logger.warning("Rebuilding engine cache entry: %s", exc)
                cache_dir.remove_tree(final_dir)
        build_fn(Path(model_dir), config, final_dir)
        engine_dir.verify_engine_dir(final_dir, expected_key=key)
    return final_dir
