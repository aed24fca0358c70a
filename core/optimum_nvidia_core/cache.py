"""What the project cache holds, recognized entry by entry, so that ``optimum-nvidia info`` and ``cache clear``
count and remove only what this package wrote there: $OPTIMUM_NVIDIA_CACHE may point at any folder, and a user's
files in it are never touched.

The entries, as build/engine_dir.py and hub.py write them:
    engines/<32 hex>/                          an engine (manifest.json; or its weights and config, manifest lost)
    engines/.tmp-<32 hex>-*/, .trash-<32 hex>-*/  the leftovers of a killed build or replacement
    models/<name>-gguf-v<N>/                   a converted checkpoint (conversion.json, written by hub.convert_gguf)
    models/.<name>-gguf-v<N>.tmp-*/            the leftover of a killed conversion
Anything else, and anything behind a symbolic link (this package never makes one), is left alone. Lock files
(engines/<key>.lock, models/.<name>.lock) stay: deleting one that a running build holds would let a second build
in. An entry whose lock a running build holds is skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .hub import project_cache_dir

ENGINES, MODELS = "engines", "models"
_KEY = r"[0-9a-f]{32}"  # engine_dir.cache_key: 32 hex digits
_ENGINE = re.compile(_KEY)
_ENGINE_LEFTOVER = re.compile(rf"\.(?:tmp|trash)-({_KEY})-[A-Za-z0-9_]+")
_CONVERTED = re.compile(r"[A-Za-z0-9._-]+-gguf-v\d+")
_CONVERSION_LEFTOVER = re.compile(rf"\.({_CONVERTED.pattern})\.tmp-\d+-[0-9a-f]+")


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # shown by `info`
    size: int  # bytes
    lock: Path  # the file lock its builder holds


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The entries under ``root`` (default: the project cache), engines first."""
    root = project_cache_dir() if root is None else Path(root)
    return _engine_entries(_real_dir(root / ENGINES)) + _model_entries(_real_dir(root / MODELS))


def foreign_paths(root: Path | None = None) -> list[Path]:
    """What else is under ``root`` (top level, and inside engines/ and models/): files this package did not write."""
    root = project_cache_dir() if root is None else Path(root)
    ours = {e.path for e in cache_entries(root)} | {root / ENGINES, root / MODELS}
    top = _children(root if root.is_dir() else None)  # the root itself may be a link the user made
    candidates = top + _children(_real_dir(root / ENGINES)) + _children(_real_dir(root / MODELS))
    return [p for p in candidates if p not in ours and not _is_lock_file(p)]


def remove_entries(entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Delete ``entries``, each under its builder's lock. Returns (removed, skipped because a build holds them)."""
    from filelock import FileLock, Timeout

    removed, busy = [], []
    for entry in entries:
        try:
            with FileLock(str(entry.lock), timeout=0):
                shutil.rmtree(entry.path)  # never follows symbolic links inside
            removed.append(entry)
        except Timeout:
            busy.append(entry)
    return removed, busy


# ---- recognizing entries ----------------------------------------------------------------------------------------
def _engine_entries(engines: Path | None) -> list[CacheEntry]:
    found = []
    for path in _children(engines):
        if not _is_real_dir(path):
            continue
        if _ENGINE.fullmatch(path.name):
            kind = _engine_kind(path)
            key = path.name
        elif match := _ENGINE_LEFTOVER.fullmatch(path.name):
            kind, key = "incomplete build", match.group(1)
        else:
            continue
        if kind is not None:
            found.append(CacheEntry(path, kind, dir_size(path), engines / f"{key}.lock"))
    return found


def _engine_kind(path: Path) -> str | None:
    manifest = _json_dict(path / "manifest.json")
    if manifest is not None and "identity" in manifest:
        recipe = manifest["identity"].get("recipe") if isinstance(manifest["identity"], dict) else None
        recipe = recipe if isinstance(recipe, dict) else {}
        weights = "fp8" if recipe.get("use_fp8") else "unquantized"
        kv = ", fp8 kv cache" if recipe.get("kv_cache_dtype") == "fp8" else ""
        return f"engine ({manifest.get('model_name', '?')}, {weights}{kv})"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "engine (damaged: no readable manifest; rebuilt on next use)"
    return None


def _model_entries(models: Path | None) -> list[CacheEntry]:
    found = []
    for path in _children(models):
        if not _is_real_dir(path):
            continue
        if _CONVERTED.fullmatch(path.name) and (_json_dict(path / "conversion.json") or {}).get("source") == "gguf":
            found.append(CacheEntry(path, "model checkpoint (converted from GGUF)", dir_size(path),
                                    models / f".{path.name}.lock"))
        elif match := _CONVERSION_LEFTOVER.fullmatch(path.name):
            found.append(CacheEntry(path, "incomplete conversion", dir_size(path), models / f".{match.group(1)}.lock"))
    return found


def _is_lock_file(path: Path) -> bool:
    name = path.name
    return path.is_file() and (re.fullmatch(rf"{_KEY}\.lock", name) is not None
                               or re.fullmatch(rf"\.{_CONVERTED.pattern}\.lock", name) is not None)


# ---- small helpers ----------------------------------------------------------------------------------------------
def dir_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, symbolic links neither followed nor counted."""
    total = 0
    for folder, _, files in os.walk(path, followlinks=False):
        for name in files:
            file = Path(folder, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def _real_dir(path: Path) -> Path | None:
    return path if _is_real_dir(path) else None


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _children(folder: Path | None) -> list[Path]:
    return sorted(folder.iterdir()) if folder is not None else []


def _json_dict(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
