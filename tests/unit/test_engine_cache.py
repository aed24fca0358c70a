"""Engine cache: build once, verify on every use, rebuild anything partial or corrupted, build once across processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from optimum_nvidia_core.build import EngineDirError, get_or_build, load_engine, verify_engine_dir
from optimum_nvidia_core.build import builder
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

sys.path.insert(0, str(Path(__file__).parent))
from test_fp8_build import make_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _config(tiny_dir, **overrides) -> EngineConfig:
    options = dict(model=str(tiny_dir), use_fp8=True, kv_cache_dtype="fp8", calibration_samples=4,
                   calibration_max_length=32, device="cpu")
    return EngineConfig(**{**options, **overrides})


class CountingBuilder:
    """The real build, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model_dir, config, out_dir):
        self.calls += 1
        return builder.build_fp8_engine(model_dir, config, out_dir)


def test_second_get_or_build_skips_calibration(tiny_dir, tmp_path):
    build = CountingBuilder()
    first = get_or_build(tiny_dir, _config(tiny_dir), build, cache_root=tmp_path)
    second = get_or_build(tiny_dir, _config(tiny_dir, max_batch_size=3, max_num_tokens=64), build, cache_root=tmp_path)
    assert first == second and build.calls == 1  # build shapes are recorded, not part of the key
    model = load_engine(second, torch.float32, "cpu")
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    get_or_build(tiny_dir, _config(tiny_dir, activation_scheme="dynamic"), build, cache_root=tmp_path)
    get_or_build(tiny_dir, _config(tiny_dir, calibration_dataset=["other data", "more"]), build, cache_root=tmp_path)
    assert build.calls == 3  # a different recipe or calibration set is a different engine


def test_iterator_calibration_data_is_read_once_and_cached(tiny_dir, tmp_path):
    build = CountingBuilder()
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta"]
    first = get_or_build(tiny_dir, _config(tiny_dir, calibration_dataset=iter(texts)), build, cache_root=tmp_path)
    second = get_or_build(tiny_dir, _config(tiny_dir, calibration_dataset=iter(texts)), build, cache_root=tmp_path)
    assert first == second and build.calls == 1


def test_changed_source_weights_rebuild(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "model", seed=1)
    build = CountingBuilder()
    first = get_or_build(source, _config(source), build, cache_root=tmp_path / "cache")
    make_tiny_checkpoint(source, seed=2)  # same shapes, new weights
    second = get_or_build(source, _config(source), build, cache_root=tmp_path / "cache")
    assert first != second and build.calls == 2


@pytest.fixture
def remembered_hashes(tmp_path, monkeypatch) -> list:
    """Every source file takes the big-file path (hashed once, remembered under a fresh project cache); returns the
    list of files hashed."""
    from optimum_nvidia_core.build import source_fingerprint

    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "project-cache"))
    monkeypatch.setattr(source_fingerprint, "FULL_HASH_LIMIT", 0)
    hashed = []
    real = source_fingerprint.file_sha256
    monkeypatch.setattr(source_fingerprint, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    return hashed


def test_big_source_files_are_hashed_once_then_trusted_while_unchanged(remembered_hashes, tmp_path):
    source = make_tiny_checkpoint(tmp_path / "model", seed=1)
    files = sorted(p.name for p in source.iterdir())
    build = CountingBuilder()
    first = get_or_build(source, _config(source), build, cache_root=tmp_path / "cache")
    assert sorted(remembered_hashes) == files
    remembered_hashes.clear()
    assert get_or_build(source, _config(source), build, cache_root=tmp_path / "cache") == first
    assert remembered_hashes == []  # stamps unchanged: nothing read
    os.utime(source / "config.json")  # touched, not changed: hashed again, same content, same engine
    assert get_or_build(source, _config(source), build, cache_root=tmp_path / "cache") == first
    assert remembered_hashes == ["config.json"] and build.calls == 1


def test_a_shard_rewritten_with_its_size_header_and_mtime_kept_rebuilds(remembered_hashes, tmp_path):
    source = make_tiny_checkpoint(tmp_path / "model", seed=1)
    build = CountingBuilder()
    first = get_or_build(source, _config(source), build, cache_root=tmp_path / "cache")
    weights = next(source.glob("*.safetensors"))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one weight in the middle: a partial fine-tune saved over its base
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = get_or_build(source, _config(source), build, cache_root=tmp_path / "cache")
    assert second != first and build.calls == 2


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weight_byte", "edit_manifest", "drop_manifest",
                                    "delete_tokenizer"])
def test_damaged_entry_is_detected_and_rebuilt(tiny_dir, tmp_path, damage):
    build = CountingBuilder()
    entry = get_or_build(tiny_dir, _config(tiny_dir), build, cache_root=tmp_path)
    weights, manifest = entry / "model-layer-00001.safetensors", entry / "manifest.json"  # a layer-by-layer build
    if damage == "truncate_weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "flip_weight_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(data)
    elif damage == "edit_manifest":
        content = json.loads(manifest.read_text())
        content["identity"]["recipe"]["activation_scheme"] = "dynamic"
        manifest.write_text(json.dumps(content))
    elif damage == "drop_manifest":
        manifest.unlink()
    else:
        (entry / "tokenizer.json").unlink()
    builder_module_cache = __import__("optimum_nvidia_core.build.engine_dir", fromlist=["_verified"])._verified
    builder_module_cache.clear()  # as in a fresh process: nothing verified yet
    with pytest.raises(EngineDirError):
        load_engine(entry, torch.float32, "cpu")  # never loaded
    rebuilt = get_or_build(tiny_dir, _config(tiny_dir), build, cache_root=tmp_path)
    assert rebuilt == entry and build.calls == 2
    verify_engine_dir(rebuilt)
    load_engine(rebuilt, torch.float32, "cpu")


def _child_script(tmp_path: Path, body: str) -> Path:
    """A Python script for a child process: sets up imports and a config for the tiny model, then runs body."""
    script = tmp_path / f"child_{abs(hash(body))}.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from optimum_nvidia_core.build import builder, engine_dir, get_or_build
        from optimum_nvidia_core.config import EngineConfig
        model_dir, cache, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
        config = EngineConfig(model=str(model_dir), use_fp8=True, kv_cache_dtype="fp8", calibration_samples=4,
                              calibration_max_length=32, device="cpu")
    """) + textwrap.dedent(body))
    return script


def _spawn(script: Path, *args: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'core'}{os.pathsep}{REPO}"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"child exited early: {process.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_two_processes_build_the_same_key_once(tiny_dir, tmp_path):
    script = _child_script(tmp_path, """
        def counted_build(model_dir, config, out_dir):
            with open(work / "builds.log", "a") as log:
                log.write("build\\n")
            time.sleep(1.0)  # hold the lock long enough for the other process to wait on it
            return builder.build_fp8_engine(model_dir, config, out_dir)
        (work / f"ready-{sys.argv[4]}").touch()
        while not (work / "go").exists():
            time.sleep(0.01)
        print(get_or_build(model_dir, config, counted_build, cache_root=cache))
    """)
    children = [_spawn(script, tiny_dir, tmp_path / "cache", tmp_path, i) for i in range(2)]
    for i, child in enumerate(children):
        _wait_for(tmp_path / f"ready-{i}", child)
    (tmp_path / "go").touch()
    results = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), results
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(paths) == 1
    assert (tmp_path / "builds.log").read_text().count("build") == 1
    verify_engine_dir(Path(paths.pop()))


def test_build_killed_midway_leaves_nothing_loadable(tiny_dir, tmp_path):
    # The child stalls after writing the weights, before the manifest; then it is killed with SIGKILL.
    script = _child_script(tmp_path, """
        original = engine_dir.finalize_engine_dir
        def stalled(out_dir, manifest):
            (work / "stalled").touch()
            time.sleep(600)
            return original(out_dir, manifest)
        engine_dir.finalize_engine_dir = stalled
        get_or_build(model_dir, config, cache_root=cache)
    """)
    cache = tmp_path / "cache"
    child = _spawn(script, tiny_dir, cache, tmp_path)
    _wait_for(tmp_path / "stalled", child)
    assert any(p.name.startswith(".tmp-") and (p / "model.safetensors.index.json").exists() for p in cache.iterdir())
    child.kill()
    child.communicate(timeout=60)
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == []  # the partial build never got its final name
    build = CountingBuilder()
    entry = get_or_build(tiny_dir, _config(tiny_dir), build, cache_root=cache)  # the dead child's lock is free
    assert build.calls == 1
    assert not any(p.name.startswith(".tmp-") for p in cache.iterdir())  # leftovers cleaned under the lock
    load_engine(entry, torch.float32, "cpu")
