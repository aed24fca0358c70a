"""Content identity of a source checkpoint's files, for the engine cache key (builder.make_manifest).

A file's identity is the sha256 of its whole content: a copy of a checkpoint finds the engines built from the
original, and a shard rewritten in place (a fine-tune saved over its base: same size, same first and last bytes)
never finds an engine of the old weights. Hashing a 16 GB checkpoint at every start would cost seconds, so:
  * a file in the Hugging Face cache is a link to a blob named by its sha256: that name is the hash;
  * a small file (up to FULL_HASH_LIMIT) is hashed whole, every time;
  * a big file is hashed once (several in parallel threads) and its hash remembered under
    ``<project cache>/fingerprints/``, keyed by its real path and stamped with its stat (device, inode, size, mtime,
    ctime) and its safetensors header; a later start reuses the hash while the stamp is unchanged.
Any write to a file changes its ctime, which (unlike mtime) no user call can set back, and a replaced file has a new
inode: either means hashing again. The trade: damage below the file system (a disk's bit rot) keeps the stamp, and
so the old hash, as a Hugging Face cache keeps trusting its blob names. Where the project cache cannot be written,
big files are simply hashed at every start.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from optimum_nvidia_core import cache_dir
from optimum_nvidia_core.build.engine_dir import file_sha256

FULL_HASH_LIMIT = 64 << 20  # bytes: files up to this size are hashed whole at every start
_MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header


def fingerprints(paths: list[Path]) -> dict[str, str]:
    """{file name: "sha256:<hex of its content>"} for ``paths``; big files not remembered are hashed in parallel."""
    resolved = {path.name: path.resolve() for path in paths}
    known = {name: _blob_hash(path) for name, path in zip(resolved, paths)}
    todo = [name for name, hash_ in known.items() if hash_ is None]
    workers = max(1, min(8, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on big buffers
        for name, hash_ in zip(todo, pool.map(_content_hash, [resolved[n] for n in todo])):
            known[name] = hash_
    return {name: "sha256:" + hash_ for name, hash_ in known.items()}


def _blob_hash(path: Path) -> str | None:
    """The sha256 a Hugging Face cache names the blob of ``path`` by (LFS files); None for any other file."""
    resolved = path.resolve()
    if path.is_symlink() and resolved.parent.name == "blobs" and len(resolved.name) == 64:
        return resolved.name
    return None


def _content_hash(path: Path) -> str:
    if path.stat().st_size <= FULL_HASH_LIMIT:
        return file_sha256(path)
    record = _record_path(path)
    stamp = _stamp(path)
    try:
        remembered = json.loads(record.read_text())
        if remembered["stamp"] == stamp:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # nothing remembered yet, or unreadable: hash
        pass
    digest = file_sha256(path)
    if _stamp(path) == stamp:  # unchanged while it was hashed: the hash belongs to this stamp
        _remember(record, {"path": str(path), "stamp": stamp, "sha256": digest})
    return digest


def _stamp(path: Path) -> list:
    """What changes whenever the file does: stat fields and the sha256 of its safetensors header (if it has one)."""
    s = os.stat(path)
    return [s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns, _header_hash(path)]


def _header_hash(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(length)).hexdigest() if 0 < length <= _MAX_HEADER else None


def _record_path(path: Path) -> Path:
    return cache_dir.cache_root() / "fingerprints" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def _remember(record: Path, value: dict) -> None:
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value))
        os.replace(tmp, record)
    except OSError:  # a read-only cache: hashed again next time
        tmp.unlink(missing_ok=True)
