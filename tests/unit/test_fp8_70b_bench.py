"""benchmarks/fp8_70b.py on the CPU with a tiny shape: shards split between two places and linked into one
checkpoint directory load as one checkpoint; too little room is an error before anything is written; the whole
script (write, serve, measure) runs and removes every file it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config, write_tiny_tokenizer

from benchmarks import fp8_70b
from benchmarks.fp8_checkpoint_writer import plan_shards, write_fp8_checkpoint
from optimum_nvidia_core import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[2]


class FixedRoom(fp8_70b.Storage):
    """Room as given (bytes per kind), less what was written: the split does not depend on this machine's disks."""

    def __init__(self, dirs, room):
        super().__init__(dirs)
        self.budget = room

    def room(self, kind, path):
        return self.budget[kind] - self.written[kind]


def test_shards_split_between_two_places_load_as_one_checkpoint(tmp_path):
    config = tiny_config("llama3")
    shard_bytes = [nbytes for _, nbytes in plan_shards(config, torch.bfloat16, 40_000)]
    assert len(shard_bytes) >= 4
    fast, ckpt = tmp_path / "shm", tmp_path / "ckpt"
    storage = FixedRoom([("shm", fast), ("disk", ckpt)], {"shm": sum(shard_bytes[:2]), "disk": 1 << 30})
    write_fp8_checkpoint(config, ckpt, "compressed-tensors", "channel", True, True, std=0.15, max_shard_bytes=40_000,
                         place=storage)
    write_tiny_tokenizer(ckpt)
    shards = sorted(ckpt.glob("*.safetensors"))
    linked = [p for p in shards if p.is_symlink()]
    assert len(shards) == len(shard_bytes) and len(linked) == 2 and all(p.resolve().parent == fast.resolve()
                                                                         for p in linked)
    assert storage.written == {"shm": sum(shard_bytes[:2]), "disk": sum(shard_bytes[2:])}
    llm = LLM(str(ckpt), device="cpu", kv_cache_dtype="fp8", engine_process=False)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
        assert len(out.token_ids) == 3
    finally:
        llm.shutdown()


def test_too_little_room_is_an_error_before_writing(tmp_path):
    storage = FixedRoom([("shm", tmp_path / "a"), ("disk", tmp_path / "b")], {"shm": 100, "disk": 100})
    with pytest.raises(SystemExit, match=r"not enough room for the checkpoint"):
        storage.check([50, 60, 120])
    assert storage.check([50, 60]) == {"shm": 50, "disk": 40}  # first fit, in order of preference


def test_the_smoke_run_serves_measures_and_removes_its_files(tmp_path):
    out = tmp_path / "result.json"
    (tmp_path / "shm").mkdir()
    command = [sys.executable, str(REPO / "benchmarks" / "fp8_70b.py"), "--shape", "smoke", "--device", "cpu",
               "--out", str(out), "--disk-dir", str(tmp_path), "--shm-dir", str(tmp_path / "shm"),
               "--shard-bytes", "300000", "--concurrency", "3", "--prompt-len", "8", "--output-len", "4",
               "--decode-tokens", "6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": f"{REPO / 'core'}{os.pathsep}{REPO}"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["phases_s"]) == {"write_checkpoint", "engine_start", "warm_up", "decode_bs1", "concurrent_3",
                                       "clean_up"}
    assert result["decode_tok_s_bs1"] > 0 and result["output_tok_s_3x8_4"] > 0 and result["kv_cache_tokens"] > 0
    assert result["checkpoint_GB"] > 0 and sum(result["written_GB"].values()) == pytest.approx(result["checkpoint_GB"])
    assert result["removed"] and not any(Path(p).exists() for p in result["removed"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "shm"]  # nothing else left behind


def test_past_its_time_limit_the_script_stops_and_still_removes_its_files(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "fp8_70b.py"), "--shape", "smoke", "--device", "cpu",
               "--out", str(out), "--disk-dir", str(tmp_path), "--shm-dir", "", "--time-limit-s", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": f"{REPO / 'core'}{os.pathsep}{REPO}"})
    assert done.returncode == 143, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] == "SystemExit: 143" and "decode_tok_s_bs1" not in result
    assert not any(Path(p).exists() for p in result.get("removed", []))  # (none made if it stopped in the imports)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
