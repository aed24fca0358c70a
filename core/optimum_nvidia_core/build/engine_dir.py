"""Engine directories: manifest, cache key, checksums, atomic write (build/engine_cache.py builds them once).

An engine directory holds quantized weights (safetensors), scales, tokenizer files, config.json and manifest.json.
The manifest's ``identity`` (format version, source weights, device, versions, recipe, calibration data hash)
decides the cache key: ``$OPTIMUM_NVIDIA_CACHE/engines/<key>/``. Build shapes are recorded but kept out of the key,
since they do not change the weights: a new max_batch_size must not trigger a rebuild.

Safety: a directory is written under a temporary name and renamed into place only after every file and the manifest
(written last, with a sha256 per file and a checksum of itself) are on disk. Any entry that fails verification
(missing manifest, edited manifest, missing, truncated or changed file) is rebuilt, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from optimum_nvidia_core import cache_dir

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 16 << 20
# Engine dirs verified by this process, keyed by path -> manifest (mtime_ns, size): skips hashing twice in a row.
_verified: dict[str, tuple[int, int]] = {}


class EngineDirError(RuntimeError):
    """An engine directory is missing, partial, corrupted or was built for something else."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(identity: dict) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def finalize_engine_dir(out_dir: Path, manifest: dict) -> dict:
    """Hash every file in ``out_dir``, then write manifest.json (last, fsynced). Returns the written manifest."""
    out_dir = Path(out_dir)
    files = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[path.relative_to(out_dir).as_posix()] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files, "created": time.time()}
    manifest["checksum"] = _manifest_checksum(manifest)
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST_NAME)
    cache_dir.fsync_dir(out_dir)
    _remember_verified(out_dir)
    return manifest


def read_manifest(engine_dir: Path) -> dict:
    """The manifest of an engine dir, checked against its own checksum (no file hashing)."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise EngineDirError(f"{engine_dir} has no {MANIFEST_NAME}: not an engine directory, or a partial one")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineDirError(f"{path} is unreadable ({exc}); delete the directory and build again") from exc
    if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(manifest):
        raise EngineDirError(f"{path} was modified after it was written (checksum mismatch); rebuild the engine")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineDirError(
            f"{engine_dir} has engine format {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; rebuild the engine")
    return manifest


def _manifest_stamp(engine_dir: Path) -> tuple[int, int]:
    stat = (Path(engine_dir) / MANIFEST_NAME).stat()
    return stat.st_mtime_ns, stat.st_size


def _remember_verified(engine_dir: Path) -> None:
    _verified[str(Path(engine_dir).resolve())] = _manifest_stamp(engine_dir)


def verify_engine_dir(engine_dir: Path, expected_key: str | None = None) -> dict:
    """Check the manifest and the sha256 of every file it lists; raise EngineDirError on any mismatch.

    ``expected_key``: also require the manifest's identity to hash to this cache key."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if expected_key is not None and cache_key(manifest.get("identity", {})) != expected_key:
        raise EngineDirError(f"{engine_dir}: manifest identity does not match cache key {expected_key}")
    resolved = str(engine_dir.resolve())
    if _verified.get(resolved) == _manifest_stamp(engine_dir):
        return manifest
    for name, entry in manifest.get("files", {}).items():
        path = engine_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise EngineDirError(f"{engine_dir}: the manifest lists {name!r}, a file outside the engine directory; "
                                 "this engine directory was tampered with: rebuild it")
        if not path.is_file():
            raise EngineDirError(f"{engine_dir}: file {name} listed in the manifest is missing")
        if path.stat().st_size != entry["size"]:
            raise EngineDirError(
                f"{engine_dir}: {name} has {path.stat().st_size} bytes, the manifest says {entry['size']} "
                "(truncated or replaced); rebuild the engine")
        if file_sha256(path) != entry["sha256"]:
            raise EngineDirError(f"{engine_dir}: {name} is corrupted (sha256 mismatch); rebuild the engine")
    _remember_verified(engine_dir)
    return manifest


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a finished ``tmp_dir`` to ``final_dir``, replacing an old engine there."""
    cache_dir.publish(tmp_dir, final_dir)
    _verified.pop(str(final_dir.resolve()), None)
    _remember_verified(final_dir)
