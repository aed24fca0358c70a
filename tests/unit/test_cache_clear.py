"""`optimum-nvidia cache clear` / `info` touch only the cache's own entries (issue 15, item 1).

$OPTIMUM_NVIDIA_CACHE may point at a folder that also holds a user's files (a mis-set variable, a shared data
folder): those must survive, look-alikes included, and the report counts only real entries."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from filelock import FileLock

from optimum_nvidia_core.build import get_or_build
from optimum_nvidia_core.cache import cache_entries
from optimum_nvidia_core.cli import main
from optimum_nvidia_core.config import EngineConfig
from optimum_nvidia_core.hub import atomic_directory_build, converted_default_dir


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(root))
    return root


def _engine(model_dir: Path) -> Path:
    """A real cache entry, as LLM(model, use_fp8=True) makes it (no calibration: dynamic, round-to-nearest)."""
    config = EngineConfig(model=str(model_dir), use_fp8=True, activation_scheme="dynamic",
                          weight_rounding="nearest", device="cpu")
    return get_or_build(model_dir, config)


def _converted_model() -> Path:
    """A converted-checkpoint entry where hub.py writes one, with the marker hub.convert_gguf writes."""
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        (tmp / "conversion.json").write_text(json.dumps({"source": "gguf", "conversion_version": 1}))

    return atomic_directory_build(converted_default_dir(), write)


def _user_files(root: Path, outside: Path) -> list[Path]:
    """A user's files, some looking like ours: a checkpoint under models/, notes under engines/, a link."""
    files = {"my_notes.txt": "mine", "projects/code.py": "print('mine')\n",
             "models/my-model/config.json": "{}", "models/my-model/model.safetensors": "weights",
             "engines/README.txt": "my notes about engines", "engines/" + "a" * 31 + "/manifest.json": "{}"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (outside / "manifest.json").write_text(json.dumps({"identity": {}}))
    (root / "engines" / ("b" * 32)).symlink_to(outside, target_is_directory=True)  # we never make links
    return [root / name for name in files] + [outside / "manifest.json"]


def test_cache_clear_removes_its_entries_and_nothing_else(tiny_llama_dir, cache, tmp_path, capsys):
    engine = _engine(tiny_llama_dir)
    leftover = engine.parent / f".tmp-{engine.name}-k1ll3d_x"  # a killed build's temporary directory
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    converted = _converted_model()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    mine = _user_files(cache, outside)

    assert main(["info"]) == 0
    info = capsys.readouterr().out
    assert re.search(r"\(3 entries, [\d.]+ [KM]iB\)", info), info
    assert "my-model" not in info and "README" not in info

    assert main(["cache", "clear"]) == 0
    report = capsys.readouterr().out
    assert "Removed 3 cache entries" in report, report
    assert not engine.exists() and not leftover.exists() and not converted.exists()
    assert all(path.is_file() for path in mine), [p for p in mine if not p.is_file()]
    assert (cache / "engines" / ("b" * 32)).is_symlink()
    assert "Left alone 6 path(s) that are not cache entries: my_notes.txt, projects, engines/README.txt" in report
    assert cache_entries() == []


def test_an_entry_a_running_build_holds_is_kept(tiny_llama_dir, cache, capsys):
    engine = _engine(tiny_llama_dir)
    with FileLock(str(engine.parent / f"{engine.name}.lock")):  # as get_or_build holds it while building
        assert main(["cache", "clear"]) == 0
    report = capsys.readouterr().out
    assert "Removed 0 cache entries" in report and f"Skipped {engine}" in report
    assert (engine / "manifest.json").is_file()
    assert main(["cache", "clear"]) == 0 and not engine.exists()


def test_clear_on_a_missing_or_empty_cache_reports_nothing_removed(cache, capsys):
    assert main(["cache", "clear"]) == 0
    assert "Removed 0 cache entries (0.0 B)" in capsys.readouterr().out
    assert not cache.exists()  # nothing is created either
    cache.mkdir()
    assert main(["cache", "clear"]) == 0 and cache.is_dir()  # the root itself is never removed
