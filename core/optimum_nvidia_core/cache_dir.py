"""The project cache: where it is, and how a directory in it is published (built aside, renamed in under a lock).

Both kinds of entry use this: converted models (hub) and engines (build/engine_dir). A directory is written under a
hidden temporary name next to its final place (same filesystem) and renamed into place in one step, so readers see
a complete entry or none. Builders of one entry take its file lock; the one holding it removes what killed builds
left behind (``.tmp-<name>-*``, ``.trash-<name>-*``), which no live builder can own.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """$OPTIMUM_NVIDIA_CACHE, else the platform's user cache dir (e.g. ~/.cache/optimum-nvidia)."""
    configured = os.environ.get("OPTIMUM_NVIDIA_CACHE")
    if configured:
        return Path(configured).expanduser()
    try:
        import platformdirs  # lazy: not installed on every GPU machine
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimum-nvidia"
    return Path(platformdirs.user_cache_dir("optimum-nvidia"))


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold ``target``'s file lock (``.<name>.lock`` next to it), after clearing leftovers of killed builds."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        for pattern in (f".tmp-{target.name}-*", f".trash-{target.name}-*"):
            for stale in target.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        yield


def temp_dir_for(target: Path) -> Path:
    """A fresh hidden directory next to ``target`` (same filesystem, so publishing it is one atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))


def publish(tmp_dir: Path, target: Path) -> None:
    """Rename the finished ``tmp_dir`` to ``target``, replacing what was there; fsync the parent directory."""
    remove_tree(target)
    os.replace(tmp_dir, target)
    fsync_dir(target.parent)


def remove_tree(path: Path) -> None:
    """Move ``path`` out of the way with one rename (atomic), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def build_once(target: Path, build: Callable[[Path], None], is_built: Callable[[Path], bool] = Path.is_dir) -> Path:
    """``target``, built by ``build(tmp_dir)`` and published unless ``is_built(target)``. Safe across processes:
    the others wait on the lock, then find it built. A failed or killed build leaves nothing at ``target``."""
    target = Path(target)
    with build_lock(target):
        if is_built(target):
            return target
        tmp = temp_dir_for(target)
        try:
            build(tmp)
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fsync_dir(path: Path) -> None:
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
