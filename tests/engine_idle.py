"""Waiting for the engine thread to catch up (aborts and frees are applied between steps)."""
from __future__ import annotations

import time


def wait_idle(llm, timeout: float = 5.0) -> dict:
    """The engine's stats once no request runs and every KV block is free, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = llm.stats()
        if stats["running_requests"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            return stats
        time.sleep(0.02)
    return llm.stats()
