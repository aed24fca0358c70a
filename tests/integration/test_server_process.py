"""`optimum-nvidia serve` as users start it: a separate process, 127.0.0.1 by default, bounded shutdown on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from live_server import free_port
from optimum_nvidia_core.hub import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]


def test_serve_binds_loopback_and_sigterm_ends_in_flight_streams_in_bounded_time(tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "core"), str(REPO)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimum_nvidia_core", "serve", DEFAULT_MODEL, "--device", "cpu", "--port", str(port),
         "--shutdown-timeout", "2"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in Path(log.name).read_text()

        events: list[str] = []
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 4000, "ignore_eos": True, "stream": True}

        def stream() -> None:
            try:
                with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        events.append(line)
            except httpx.HTTPError:
                events.append("<connection closed>")

        reader = threading.Thread(target=stream)
        reader.start()
        while not any(e.startswith("data: {") for e in events):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - started < 20  # 2 s grace, then abort and stop the engine
        reader.join(10)
        assert not reader.is_alive()
        chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert chunks and all("error" not in c for c in chunks)  # cut off, never a stack trace
        assert proc.returncode in (0, -signal.SIGTERM), Path(log.name).read_text()  # uvicorn re-raises the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
