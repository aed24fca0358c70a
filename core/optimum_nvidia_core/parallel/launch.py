"""Starting the ranks: spawned processes (CUDA is never forked), each in one torch.distributed group (NCCL on
GPUs, gloo on the CPU), NVLink multicast off in every one of them.

The machines here are shared, and NVLink multicast (NVLS, symmetric-memory multicast, NVSHMEM's NVLS) can put
their GPUs out of service, so each spawned process starts with it off, whatever the caller's environment says.
"""
from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from typing import Callable, Iterator

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 60.0  # a collective that waits longer than this on a peer fails instead of hanging


class RankFailed(RuntimeError):
    """A rank raised or died; every other rank has been stopped."""


def rank_environment(backend: str) -> dict[str, str]:
    """The variables every spawned rank starts with."""
    env = dict(MULTICAST_OFF)
    if backend == "gloo":  # one host: gloo talks over loopback, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    return env


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` while processes are spawned (a spawned child copies it), then as it was."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_rank(rank: int, world_size: int, init_method: str, backend: str = "gloo",
              timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the default process group (inside a rank process). On CUDA, rank r uses GPU r."""
    import torch
    import torch.distributed as dist

    os.environ.update(rank_environment(backend))  # also when a rank was started by something else
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _rank_main(rank: int, fn: Callable, args: tuple, backend: str) -> None:
    os.environ.update(rank_environment(backend))
    fn(rank, *args)


def spawn_ranks(fn: Callable, world_size: int, args: tuple = (), backend: str = "gloo"):
    """Start ``fn(rank, *args)`` for rank 0..world_size-1, each in a spawned daemon process with multicast off.
    Returns torch's ProcessContext (its ``.pids()``); wait with ``join_ranks``. `fn` must be importable by name."""
    import torch.multiprocessing as mp

    with _environ(rank_environment(backend)):
        return mp.start_processes(_rank_main, args=(fn, args, backend), nprocs=world_size, join=False,
                                  daemon=True, start_method="spawn")


def join_ranks(context, timeout_s: float, grace_s: float = 1.0) -> None:
    """Wait for every rank to finish. The first rank that fails (or a timeout) stops all the others within
    `grace_s` (SIGTERM, then SIGKILL) and raises RankFailed; nothing is left running either way."""
    from torch.multiprocessing import ProcessRaisedException
    from torch.multiprocessing.spawn import ProcessExitedException

    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0), grace_period=grace_s):
            if time.monotonic() >= deadline:
                raise RankFailed(f"the ranks did not finish within {timeout_s:.0f} s")
    except (ProcessRaisedException, ProcessExitedException) as exc:
        raise RankFailed(f"rank {exc.error_index} failed: {exc}") from None
    finally:
        _stop(context, grace_s)


def _stop(context, grace_s: float) -> None:
    processes = context.processes
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()
