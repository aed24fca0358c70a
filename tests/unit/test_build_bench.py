"""benchmarks/build_bench.py's cached-start step on the CPU with a tiny engine: every part is reported, finding the
engine trusts the build's stamps (no hashing), and the end-to-end start serves."""
from __future__ import annotations

import sys
from pathlib import Path

from optimum_nvidia_core.build import engine_dir, get_or_build, read_manifest
from optimum_nvidia_core.config import EngineConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_fp8_build import make_tiny_checkpoint  # noqa: E402

from benchmarks import build_bench  # noqa: E402

OPTIONS = {"activation_scheme": "dynamic", "max_batch_size": 2, "max_seq_len": 64, "engine_process": False}


def test_cached_start_is_reported_part_by_part(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "model")
    cache = tmp_path / "cache" / "engines"
    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(cache.parent))  # restored after the test (the step sets it)
    config = EngineConfig(model=str(ckpt), use_fp8=True, weight_rounding="nearest", device="cpu", **OPTIONS)
    get_or_build(ckpt, config, cache_root=cache)
    engine_dir._verified.clear()  # as in the fresh process the step runs in on the GPU
    hashed = []
    real = engine_dir.file_sha256
    monkeypatch.setattr(engine_dir, "file_sha256", lambda path: hashed.append(path) or real(path))
    result = build_bench.step_load(str(ckpt), str(cache), "nearest", device="cpu", options=OPTIONS)
    assert result["stamps_trusted"] is True
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    engine_hashes = [p for p in hashed if p.parent == entry]  # (the source's small files are fingerprinted whole)
    assert len(engine_hashes) == len(read_manifest(entry)["files"])  # only the step's own full_hash_s pass
    for key in ("imports_and_cuda_init_s", "find_engine_s", "full_hash_s", "load_verify_s", "load_layout_s",
                "load_weights_s", "load_fuse_s", "kv_cache_s", "cuda_graphs_s", "llm_start_s", "llm_ready_s"):
        assert result[key] >= 0, key
    assert result["cached_load_s"] == result["find_engine_s"] + sum(
        result[k] for k in ("load_verify_s", "load_layout_s", "load_weights_s", "load_fuse_s"))
    assert result["kv_cache_tokens"] > 0 and result["cuda_graphs_count"] is None  # no graphs on the CPU
    assert result["llm_ready_s"] >= result["llm_start_s"]
