"""Saved engine directories are verified by content, every time they could have changed (issue 15, item 10):
weights rewritten after a first load in the same process are caught even with size and mtime kept; a missing or
looping manifest, or a manifest entry without a size, is a clear error instead of a misleading or raw one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.build import EngineDirError, engine_dir, read_manifest, verify_engine_dir
from optimum_nvidia_core.hub import ModelResolutionError

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory) -> Path:
    llm = LLM(str(tiny_llama_dir), device="cpu")
    try:
        return llm.save(tmp_path_factory.mktemp("saved") / "engine")
    finally:
        llm.shutdown()


@pytest.fixture
def engine(saved, tmp_path) -> Path:
    """A fresh copy of the saved engine directory, loaded once in this process (so its verification is remembered)."""
    copy = tmp_path / "engine"
    shutil.copytree(saved, copy)
    _load_and_generate(copy)
    return copy


def _load_and_generate(path: Path) -> list[int]:
    # On a thread of this process: what the tests check is remembered (or not) by the process that loads.
    llm = LLM(str(path), device="cpu", engine_process=False)
    try:
        return llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    finally:
        llm.shutdown()


def _rewrite_keeping_size_and_mtime(path: Path, offset: int = -8) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or a careful tamperer leaves it


def test_weights_changed_after_a_first_load_are_caught(engine):
    _rewrite_keeping_size_and_mtime(engine / "model.safetensors")
    with pytest.raises(EngineDirError, match=r"model.safetensors is corrupted \(sha256 mismatch\)"):
        LLM(str(engine), device="cpu")


def test_weights_replaced_by_another_file_are_caught(engine, tmp_path):
    other = tmp_path / "other.safetensors"
    shutil.copyfile(engine / "model.safetensors", other)
    _rewrite_keeping_size_and_mtime(other)
    stat = (engine / "model.safetensors").stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, engine / "model.safetensors")  # same size, same mtime, another inode
    with pytest.raises(EngineDirError, match="sha256 mismatch"):
        verify_engine_dir(engine)


def test_an_unchanged_directory_is_not_hashed_twice(engine, monkeypatch):
    hashed = []
    real = engine_dir.file_sha256
    monkeypatch.setattr(engine_dir, "file_sha256", lambda path: hashed.append(path) or real(path))
    verify_engine_dir(engine)
    assert hashed == []  # remembered from the load in the fixture: nothing changed since
    (engine / "tokenizer_config.json").write_text((engine / "tokenizer_config.json").read_text())  # rewritten
    verify_engine_dir(engine)
    assert len(hashed) == len(read_manifest(engine)["files"])


@pytest.mark.parametrize("damage", ["missing", "looping"])
def test_a_missing_or_looping_manifest_is_named(engine, damage):
    (engine / "manifest.json").unlink()
    if damage == "looping":
        os.symlink("manifest.json", engine / "manifest.json")
    state = "missing" if damage == "missing" else r"unreadable \(a broken or looping link"
    with pytest.raises(ModelResolutionError, match=rf"is an engine directory .* whose manifest.json is {state}.*"
                                                   r"Save or build the engine again"):
        LLM(str(engine), device="cpu")
    if damage == "looping":
        with pytest.raises(EngineDirError, match=r"manifest.json is unreadable \(.*symbolic links"):
            read_manifest(engine)


@pytest.mark.parametrize("field", ["size", "sha256"])
def test_a_manifest_entry_without_size_or_hash_is_named(engine, field):
    path = engine / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]["model.safetensors"][field]
    manifest["checksum"] = engine_dir._manifest_checksum(manifest)  # a consistent manifest, only its entry is bad
    path.write_text(json.dumps(manifest))
    with pytest.raises(EngineDirError, match=r"has an entry for 'model.safetensors' without a sha256 and a size"):
        LLM(str(engine), device="cpu")


def test_an_intact_engine_still_loads_the_same(engine, saved):
    assert _load_and_generate(engine) == _load_and_generate(saved)


def _count_hashes(monkeypatch) -> list:
    hashed = []
    real = engine_dir.file_sha256
    monkeypatch.setattr(engine_dir, "file_sha256", lambda path: hashed.append(path) or real(path))
    return hashed


def test_a_later_process_trusts_the_stamps_until_a_file_changes(engine, monkeypatch):
    hashed = _count_hashes(monkeypatch)
    engine_dir._verified.clear()  # as in a fresh process: only the stamp file next to the manifest is left
    assert (engine / engine_dir.STAMP_NAME).is_file()
    verify_engine_dir(engine)
    assert hashed == []
    verify_engine_dir(engine, full=True)
    assert len(hashed) == len(read_manifest(engine)["files"])
    engine_dir._verified.clear()
    _rewrite_keeping_size_and_mtime(engine / "model.safetensors")  # ctime moves: the stamp no longer matches
    with pytest.raises(EngineDirError, match="sha256 mismatch"):
        verify_engine_dir(engine)


def test_a_copied_engine_with_its_stamp_file_is_hashed_again(engine, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)  # copy2: mtimes kept, the stamp file comes along, the inodes are new
    hashed = _count_hashes(monkeypatch)
    engine_dir._verified.clear()
    verify_engine_dir(copy)
    assert len(hashed) == len(read_manifest(copy)["files"])
    hashed.clear()
    engine_dir._verified.clear()
    verify_engine_dir(copy)  # the copy now has stamps of its own
    assert hashed == []


def test_an_engine_whose_stamp_cannot_be_written_is_hashed_every_time(engine, monkeypatch):
    (engine / engine_dir.STAMP_NAME).unlink()
    (engine / engine_dir.STAMP_NAME).mkdir()  # as unwritable as it gets when the tests run as root
    hashed = _count_hashes(monkeypatch)
    for _ in range(2):
        engine_dir._verified.clear()
        verify_engine_dir(engine)
    assert len(hashed) == 2 * len(read_manifest(engine)["files"])
    assert _load_and_generate(engine)  # still loads
