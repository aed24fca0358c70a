"""Engine directories: manifest, cache key, checksums, atomic write (build/engine_cache.py builds them once).

An engine directory holds quantized weights (safetensors), scales, tokenizer files, config.json and manifest.json.
The manifest's ``identity`` (format version, source weights, device, versions, recipe, calibration data hash)
decides the cache key: ``$OPTIMUM_NVIDIA_CACHE/engines/<key>/``. Build shapes are recorded but kept out of the key,
since they do not change the weights: a new max_batch_size must not trigger a rebuild.

Safety: a directory is written under a temporary name and renamed into place only after every file and the manifest
(written last, with a sha256 per file and a checksum of itself) are on disk. Any entry that fails verification
(missing manifest, edited manifest, missing, truncated or changed file) is rebuilt, never loaded.

Verification hashes every file once (~9 GB for an 8B engine: seconds). After that, the stat stamp of every file
(device, inode, size, mtime, ctime) is remembered, in this process and in ``.verified.json`` next to the manifest,
and a later start hashes again only if a stamp changed. Any write to a file changes its ctime (which, unlike mtime,
no user call can set back), and a replaced file has another inode, so an edited, truncated, replaced or copied file
is hashed again. The trade: damage below the file system (a disk's bit rot) keeps the stamps and is caught only by
a full check, ``verify_engine_dir(path, full=True)``. A read-only directory keeps no stamp and is hashed every time.
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
STAMP_NAME = ".verified.json"  # the stamps of the last full verification (never listed in the manifest)
_HASH_CHUNK = 16 << 20
# Engine dirs verified by this process: path -> the stat stamp of the manifest and of every file it lists, taken
# before hashing. Loading again skips the hashing only while every stamp is unchanged (a rewrite changes ctime);
# STAMP_NAME keeps the same record for later processes.
_verified: dict[str, tuple] = {}


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
    for path in sorted(p for p in out_dir.rglob("*")
                       if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(STAMP_NAME)):
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
        _write_stamp_file(engine_dir, now)


def _write_stamp_file(engine_dir: Path, stamp: tuple) -> None:
    """Best effort: a directory we cannot write to (read-only, shared) is simply hashed at every start."""
    tmp = engine_dir / f"{STAMP_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"stamp": stamp}))
        os.replace(tmp, engine_dir / STAMP_NAME)
    except OSError:
        tmp.unlink(missing_ok=True)


def _stamp_file_matches(engine_dir: Path, stamp: tuple) -> bool:
    try:
        recorded = json.loads((engine_dir / STAMP_NAME).read_text())["stamp"]
        return tuple(tuple(entry) for entry in recorded) == stamp
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: hash
        return False


def verify_engine_dir(engine_dir: Path, expected_key: str | None = None, full: bool = False) -> dict:
    """Check the manifest and the sha256 of every file it lists; raise EngineDirError on any mismatch.

    ``expected_key``: also require the manifest's identity to hash to this cache key. A directory verified before
    (by this process, or by any process that could write its STAMP_NAME) is hashed again only if a file it lists,
    or the manifest, has changed since (see _stamp and the module's docstring); ``full=True`` always hashes."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    if expected_key is not None and cache_key(manifest["identity"]) != expected_key:
        raise EngineDirError(f"{engine_dir}: manifest identity does not match cache key {expected_key}")
    stamp = _stamp(engine_dir, manifest["files"])
    if stamp is not None and not full and (_verified.get(str(engine_dir.resolve())) == stamp
                                           or _stamp_file_matches(engine_dir, stamp)):
        _verified[str(engine_dir.resolve())] = stamp
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


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a finished ``tmp_dir`` to ``final_dir``, replacing an old engine there."""
    cache_dir.publish(tmp_dir, final_dir)
    _verified.pop(str(final_dir.resolve()), None)
    _remember_verified(final_dir)
