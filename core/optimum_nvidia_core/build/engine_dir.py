"""Engine directories: manifest, cache key, checksums, atomic write, and build-once under a file lock.

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
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 16 << 20
# Engine dirs verified by this process: path -> the stat stamp of the manifest and of every file it lists, taken
# before hashing. Loading again skips the hashing only while every stamp is unchanged (a rewrite changes ctime).
_verified: dict[str, tuple] = {}

logger = logging.getLogger(__name__)


class EngineDirError(RuntimeError):
    """An engine directory is missing, partial, corrupted or was built for something else."""


def engine_cache_root() -> Path:
    """<project cache>/engines: $OPTIMUM_NVIDIA_CACHE, else the user cache dir (~/.cache/optimum-nvidia), as hub.py."""
    env = os.environ.get("OPTIMUM_NVIDIA_CACHE")
    if env:
        return Path(env).expanduser() / "engines"
    try:
        import platformdirs  # lazy: not installed on every GPU machine
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimum-nvidia" / "engines"
    return Path(platformdirs.user_cache_dir("optimum-nvidia")) / "engines"


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    _fsync_dir(out_dir)
    _remember_verified(out_dir)
    return manifest


def read_manifest(engine_dir: Path) -> dict:
    """The manifest of an engine dir, checked against its own checksum and for its shape (no file hashing)."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        raise EngineDirError(f"{engine_dir} has no {MANIFEST_NAME}: not an engine directory, or a partial one")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a broken or looping link lands here too
        raise EngineDirError(f"{path} is unreadable ({exc}); delete the directory and build again") from exc
    if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(manifest):
        raise EngineDirError(f"{path} was modified after it was written (checksum mismatch); rebuild the engine")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineDirError(
            f"{engine_dir} has engine format {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; rebuild the engine")
    _check_manifest_shape(manifest, path)
    return manifest


def _check_manifest_shape(manifest: dict, path: Path) -> None:
    """Every field the loader reads, of the type it reads it as: a bad one is an EngineDirError, not a KeyError."""
    problem = None
    files, identity = manifest.get("files"), manifest.get("identity")
    if not isinstance(files, dict) or not files:
        problem = "lists no files"
    elif not isinstance(identity, dict) or not isinstance(identity.get("recipe"), dict):
        problem = "has no identity recipe"
    for name, entry in files.items() if problem is None else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or isinstance(entry.get("size"), bool) or not isinstance(entry.get("size"), int):
            problem = f"has an entry for {name!r} without a sha256 and a size in bytes"
            break
    if problem:
        raise EngineDirError(f"{path} {problem}: it was not written by this package, or was damaged; rebuild the "
                             "engine")


def _stamp(engine_dir: Path, names) -> tuple | None:
    """(name, device, inode, size, mtime_ns, ctime_ns) of the manifest and of ``names``; None if one is missing."""
    try:
        stats = [(name, os.stat(engine_dir / name)) for name in (MANIFEST_NAME, *sorted(names))]
    except OSError:
        return None
    return tuple((name, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats)


def _remember_verified(engine_dir: Path, stamp: tuple | None = None) -> None:
    """Remember ``engine_dir`` as verified. ``stamp``: taken before hashing, kept only if the files still have it
    after; None: its files were just written and hashed by this process (finalize, publish), stamp them now."""
    engine_dir = Path(engine_dir)
    if stamp is None:
        names = json.loads((engine_dir / MANIFEST_NAME).read_text())["files"]
    else:
        names = [name for name, *_ in stamp[1:]]
    now = _stamp(engine_dir, names)
    if now is not None and (stamp is None or now == stamp):
        _verified[str(engine_dir.resolve())] = now


def verify_engine_dir(engine_dir: Path, expected_key: str | None = None) -> dict:
    """Check the manifest and the sha256 of every file it lists; raise EngineDirError on any mismatch.

    ``expected_key``: also require the manifest's identity to hash to this cache key. A directory verified before
    in this process is hashed again unless no file it lists (nor the manifest) has changed since (see _stamp)."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if expected_key is not None and cache_key(manifest["identity"]) != expected_key:
        raise EngineDirError(f"{engine_dir}: manifest identity does not match cache key {expected_key}")
    stamp = _stamp(engine_dir, manifest["files"])
    if stamp is not None and _verified.get(str(engine_dir.resolve())) == stamp:
        return manifest
    for name, entry in manifest["files"].items():
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
    _remember_verified(engine_dir, stamp)
    return manifest


def _remove_tree(path: Path) -> None:
    """Move ``path`` out of the way with one rename (atomic), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a finished ``tmp_dir`` to ``final_dir``, replacing an old engine there."""
    _remove_tree(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    _verified.pop(str(final_dir.resolve()), None)
    _remember_verified(final_dir)


def temp_dir_for(final_dir: Path) -> Path:
    """A fresh temporary directory next to ``final_dir`` (same filesystem, so the final rename is atomic)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))


def _remove_stale_temps(root: Path, key: str) -> None:
    """Leftovers of killed builds of this key. Called under the key's lock, so no live builder owns them."""
    for stale in root.glob(f".tmp-{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".trash-{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def get_or_build(model_dir: Path, config, build_fn: Callable | None = None, cache_root: Path | None = None) -> Path:
    """The verified engine dir for (model_dir, config), building it once if needed. Safe across processes.

    ``build_fn(model_dir, config, out_dir)`` writes a complete engine (weights, tokenizer, manifest via
    ``save_engine``) into ``out_dir``; default ``build_fp8_engine``. The ``config`` it receives has its calibration
    data already materialized as a list, so an iterator given by the user is read only once.
    """
    from filelock import FileLock

    from optimum_nvidia_core.build.builder import build_fp8_engine, prepare_build

    build_fn = build_fn or build_fp8_engine
    config, manifest = prepare_build(Path(model_dir), config)
    key = cache_key(manifest["identity"])
    root = Path(cache_root) if cache_root is not None else engine_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / key
    with FileLock(str(root / f"{key}.lock")):
        try:
            verify_engine_dir(final_dir, expected_key=key)
            return final_dir
        except EngineDirError as exc:
            if final_dir.exists():
                logger.warning("Rebuilding engine cache entry: %s", exc)
                _remove_tree(final_dir)
        _remove_stale_temps(root, key)
        build_fn(Path(model_dir), config, final_dir)
        verify_engine_dir(final_dir, expected_key=key)
    return final_dir
