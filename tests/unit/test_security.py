"""Security: safetensors only by default, no remote code ever, and no crafted model id, checkpoint index or engine
manifest can make us read or write outside the cache or the directory we were given."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core import hub
from optimum_nvidia_core.hub import ModelResolutionError, resolve_model

GOOD = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


def _llm(path: Path, **options) -> LLM:
    return LLM(str(path), device="cpu", block_size=4, max_seq_len=64, **options)


def _generate_once(path: Path, **options) -> list[int]:
    llm = _llm(path, **options)
    try:
        return llm.generate([PROMPT], GOOD)[0].token_ids
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama_dir) -> list[int]:
    return _generate_once(tiny_llama_dir)


class WritesAFileWhenUnpickled:
    """A pickle payload: unpickling it calls open(marker, 'w'), i.e. runs code of the file's choosing."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _copy_without_safetensors(tiny_llama_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_llama_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


# ---- pickle ------------------------------------------------------------------------------------------------------

def test_pickle_weights_refused_by_default_and_never_opened(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    model = _copy_without_safetensors(tiny_llama_dir, tmp_path / "malicious")
    torch.save({"model.norm.weight": WritesAFileWhenUnpickled(marker)}, model / "pytorch_model.bin")
    with pytest.raises(ModelResolutionError, match=r"pickle .*refused.*allow_pickle_weights=True"):
        _llm(model)
    assert not marker.exists()


def test_even_allowed_pickles_cannot_run_code(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    model = _copy_without_safetensors(tiny_llama_dir, tmp_path / "malicious")
    torch.save({"model.norm.weight": WritesAFileWhenUnpickled(marker)}, model / "pytorch_model.bin")
    from optimum_nvidia_core.models.loader import load_model

    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global|unpickl"):
        load_model(model, torch.float32, "cpu", allow_pickle=True)  # torch.load(weights_only=True) refuses it
    assert not marker.exists()


def test_allowed_plain_pickle_weights_load_the_same_model(tiny_llama_dir, tmp_path, reference_tokens):
    from safetensors.torch import load_file

    model = _copy_without_safetensors(tiny_llama_dir, tmp_path / "pickled")
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), model / "pytorch_model.bin")
    assert _generate_once(model, allow_pickle_weights=True) == reference_tokens


# ---- remote code -------------------------------------------------------------------------------------------------

def test_auto_map_remote_code_is_never_imported(tiny_llama_dir, tmp_path, reference_tokens):
    """config.json and tokenizer_config.json point at code in the checkpoint; loading must not import it."""
    marker = tmp_path / "PWNED"
    model = tmp_path / "remote_code"
    shutil.copytree(tiny_llama_dir, model)
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig): pass\n"
        "class EvilModel(LlamaForCausalLM): pass\n"
        "class EvilTokenizer(PreTrainedTokenizerFast): pass\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert _generate_once(model) == reference_tokens  # our own model class, the plain tokenizer
    assert not marker.exists()


def test_chat_templates_run_sandboxed(tiny_llama_dir, tmp_path):
    """A chat template is code shipped with the model: it must not reach Python internals."""
    from optimum_nvidia_core.chat import ChatFormatter
    from transformers import AutoTokenizer

    marker = tmp_path / "PWNED"
    payload = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    formatter = ChatFormatter(tokenizer, chat_template=payload)
    with pytest.raises(ValueError, match="chat template rejected"):
        formatter.render([{"role": "user", "content": "Hi"}])
    assert not marker.exists()


# ---- model ids, checkpoint indexes and manifests stay inside their directories -----------------------------------

CRAFTED_IDS = [
    "../x", "../../etc/passwd", "owner/../../x", "owner/..", "owner/.", "./owner/name", "~root/model",
    "/absolute/missing/model", "owner//name", "owner/name/../../../tmp", "%2e%2e/%2e%2e/etc", "owner/na--me",
    "owner/name\x00.json", "https://evil.example/owner/name", "owner/name?revision=x",
    "C:\\Windows\\System32", "\uff0e\uff0e/\uff0e\uff0e/etc", "owner/" + "a" * 200,
]


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Empty HF and project caches; every hub access is recorded instead of made."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("OPTIMUM_NVIDIA_CACHE", str(tmp_path / "project_cache"))
    calls = []

    def recording_snapshot(model_id, revision, patterns, local_files_only):
        calls.append((model_id, revision))
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(hub, "_snapshot", recording_snapshot)
    return tmp_path, calls


@pytest.mark.parametrize("model_id", CRAFTED_IDS, ids=lambda s: repr(s)[1:40])
def test_crafted_model_ids_never_reach_the_hub_or_the_caches(model_id, isolated_caches):
    tmp_path, hub_calls = isolated_caches
    with pytest.raises(ModelResolutionError, match=r"not a directory|nor a valid Hugging Face repo id|is empty"):
        resolve_model(model_id)
    assert hub_calls == []  # refused before any cache path was built from it
    assert not (tmp_path / "hf_home").exists() and not (tmp_path / "project_cache").exists()


def test_repo_id_with_a_trailing_newline_is_refused(isolated_caches):
    _, hub_calls = isolated_caches
    with pytest.raises(ModelResolutionError, match="nor a valid Hugging Face repo id"):
        resolve_model("owner/name\n")
    assert hub_calls == []


@pytest.mark.parametrize("revision", ["../../x", "/etc", "a\\b", "", "refs/../../../x"])
def test_crafted_revisions_are_refused(revision, isolated_caches):
    _, hub_calls = isolated_caches
    with pytest.raises(ModelResolutionError, match="Invalid revision"):
        resolve_model("owner/name", revision=revision)
    assert hub_calls == []


def test_valid_repo_ids_resolve_only_inside_the_hf_cache(isolated_caches, monkeypatch):
    _, hub_calls = isolated_caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="is not in the Hugging Face cache"):
        resolve_model("owner/name.v2_final-1")
    assert hub_calls == [("owner/name.v2_final-1", None)]  # the id goes to the hub client as it is, nothing else


def test_checkpoint_index_cannot_point_outside_the_directory(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_llama_dir / "model.safetensors", outside / "model.safetensors")
    model = _copy_without_safetensors(tiny_llama_dir, tmp_path / "sharded")
    shutil.copy(tiny_llama_dir / "model.safetensors", model / "model-00001-of-00001.safetensors")
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as reader:
        names = list(reader.keys())
    index = {"metadata": {}, "weight_map": {name: "../outside/model.safetensors" for name in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelResolutionError, match=r"outside"):
        _llm(model)


def test_engine_manifest_cannot_list_files_outside_the_directory(tiny_llama_dir, tmp_path):
    from optimum_nvidia_core.build import EngineDirError, engine_dir, save_engine
    from optimum_nvidia_core.models.loader import load_model

    model = load_model(tiny_llama_dir, torch.float32, "cpu")
    saved = save_engine(model, tiny_llama_dir, tmp_path / "engine")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = {"sha256": engine_dir.file_sha256(secret), "size": secret.stat().st_size}
    manifest["checksum"] = engine_dir._manifest_checksum(manifest)  # an attacker can recompute it too
    (saved / "manifest.json").write_text(json.dumps(manifest))
    engine_dir._verified.clear()
    with pytest.raises(EngineDirError, match=r"outside"):
        engine_dir.verify_engine_dir(saved)
