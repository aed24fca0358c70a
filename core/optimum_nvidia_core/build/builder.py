"""Build, save and load engines: load the source model, calibrate, quantize, write an engine directory.

    build_fp8_engine(model_dir, config, out_dir)             # load -> calibrate -> quantize -> save
    save_engine(model, tokenizer_src_dir, out_dir, manifest)  # atomic: temp dir, checksums, rename
    load_engine(engine_dir, dtype, device)                    # verified; Fp8Linear modules + KV scales
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from optimum_nvidia_core.build import calibration, engine_dir
from optimum_nvidia_core.devices import pick_device, pick_dtype
from optimum_nvidia_core.build.quantize import (
    Fp8Recipe, check_fp8_supported, kv_scales, quantize_model, set_kv_scales, swap_in_empty_fp8,
)
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

WEIGHTS_NAME = "model.safetensors"
# Source files that are weights (re-written by us) or ours; everything else (config, tokenizer, chat template,
# generation config) is copied into the engine so it loads on its own.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".index.json", ".lock")
_FULL_HASH_LIMIT = 64 << 20  # files up to this size are hashed whole; bigger ones get a sampled fingerprint
_SAMPLE_BYTES = 4 << 20


def resolve_device_dtype(config) -> tuple[torch.device, torch.dtype]:
    """config.device / config.dtype with 'auto' resolved exactly as the engine resolves them."""
    device = pick_device(config.device)
    return device, pick_dtype(config.dtype, device)


def describe_device(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type, "name": "cpu", "capability": None}
    return {"type": "cuda", "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device))}


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-nvidia-langchain-llamaindex")
    except PackageNotFoundError:
        return "0+source"


def file_fingerprint(path: Path) -> str:
    """Content identity of a source file, cheap even for 15 GB shards.

    A file in the Hugging Face cache is a link to a blob named by its sha256: that name is the hash. Small files
    are hashed whole. Big local files: sha256 of their size plus their first and last 4 MiB (a changed shard
    almost always changes size or its ends; hashing 15 GB at every start would cost more than the load)."""
    resolved = path.resolve()
    if path.is_symlink() and resolved.parent.name == "blobs" and len(resolved.name) == 64:
        return "sha256:" + resolved.name
    size = resolved.stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return "sha256:" + engine_dir.file_sha256(resolved)
    digest = hashlib.sha256(str(size).encode())
    with open(resolved, "rb") as f:
        digest.update(f.read(_SAMPLE_BYTES))
        f.seek(size - _SAMPLE_BYTES)
        digest.update(f.read(_SAMPLE_BYTES))
    return "sampled-sha256:" + digest.hexdigest()


def source_description(model_dir: Path) -> dict:
    files = {p.name: file_fingerprint(p) for p in sorted(Path(model_dir).iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != engine_dir.MANIFEST_NAME}
    # A Hugging Face snapshot dir is named by its commit: that is the resolved revision.
    revision = model_dir.name if model_dir.parent.name == "snapshots" else None
    return {"revision": revision, "files": files}


def make_manifest(model_dir: Path, config, samples: list | None) -> dict:
    """The manifest of the engine ``config`` builds from ``model_dir``; ``identity`` decides the cache key."""
    device, dtype = resolve_device_dtype(config)
    recipe = Fp8Recipe.from_config(config)
    identity = {
        "format_version": engine_dir.FORMAT_VERSION,
        "source": source_description(Path(model_dir)),
        "device": describe_device(device),
        "versions": {"torch": torch.__version__, "optimum_nvidia": project_version()},
        "recipe": {**recipe.to_dict(), "dtype": str(dtype).removeprefix("torch.")},
        "calibration": None if samples is None else {
            "hash": calibration.calibration_hash(samples, config.calibration_max_length),
            "samples": len(samples), "max_length": config.calibration_max_length,
        },
    }
    return {
        "identity": identity,
        "model_name": config.model,
        "source_dir": str(model_dir),
        "shapes": {"max_batch_size": config.max_batch_size, "max_seq_len": config.max_seq_len,
                   "max_num_tokens": config.max_num_tokens},
    }


def prepare_build(model_dir: Path, config) -> tuple[object, dict]:
    """Materialize the calibration samples (read an iterator once) and compute the manifest.

    Returns (config with calibration_dataset = the chosen samples, manifest)."""
    recipe = Fp8Recipe.from_config(config)
    samples = None
    if recipe.needs_calibration:
        samples = calibration.select_calibration_samples(config.calibration_dataset, config.calibration_samples)
        config = config.model_copy(update={"calibration_dataset": samples})
    return config, make_manifest(model_dir, config, samples)


def build_fp8_engine(model_dir: Path, config, out_dir: Path) -> Path:
    """Load the high-precision model, calibrate (if the recipe needs it), quantize, save to ``out_dir``."""
    from transformers import AutoTokenizer

    from optimum_nvidia_core.models.loader import load_model

    model_dir = Path(model_dir)
    config, manifest = prepare_build(model_dir, config)
    recipe = Fp8Recipe.from_config(config)
    device, dtype = resolve_device_dtype(config)
    if recipe.use_fp8 or recipe.kv_cache_dtype == "fp8":
        check_fp8_supported(device)
    model = load_model(model_dir, dtype, device)
    token_lists = None
    if recipe.needs_calibration:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        samples = config.calibration_dataset
        token_lists = calibration.tokenize_samples(tokenizer, samples, config.calibration_max_length)
    quantize_model(model, recipe, token_lists)
    return save_engine(model, model_dir, out_dir, manifest)


def recipe_of(model: nn.Module) -> Fp8Recipe:
    """The recipe a (possibly quantized) model was built with, read from its modules."""
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    k, v = kv_scales(model) if hasattr(model.attention_layers()[0], "k_scale") else ([1.0], [1.0])
    return Fp8Recipe(
        use_fp8=bool(fp8),
        weight_scale="channel" if not fp8 or fp8[0].per_channel else "tensor",
        activation_scheme="static" if not fp8 or fp8[0].input_scale is not None else "dynamic",
        kv_cache_dtype="fp8" if any(s != 1.0 for s in k + v) else "auto",
    )


def _copy_support_files(src_dir: Path, out_dir: Path) -> None:
    for path in sorted(Path(src_dir).iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_NOT_COPIED) \
                and path.name != engine_dir.MANIFEST_NAME:
            shutil.copyfile(path, out_dir / path.name)


def save_engine(model: nn.Module, tokenizer_src_dir: Path, out_dir: Path, manifest: dict | None = None) -> Path:
    """Write ``model`` (weights + scales), the config/tokenizer files of ``tokenizer_src_dir`` and the manifest.

    Atomic: written to a temp dir next to ``out_dir`` and renamed into place; an existing engine dir (or empty
    dir) at ``out_dir`` is replaced. ``manifest=None`` reuses the source engine's manifest (saving a loaded
    engine) or describes the model as it is."""
    from safetensors.torch import save_model

    out_dir, src = Path(out_dir), Path(tokenizer_src_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / engine_dir.MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out_dir} exists and is not an engine directory; pass a new or empty directory")
    if manifest is None:
        manifest = _manifest_for_loaded(model, src)
    manifest = {k: v for k, v in manifest.items() if k not in ("files", "checksum", "created")}
    k, v = kv_scales(model)
    manifest["kv_scales"] = {"k": k, "v": v}
    tmp = engine_dir.temp_dir_for(out_dir)
    try:
        _copy_support_files(src, tmp)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        engine_dir.finalize_engine_dir(tmp, manifest)
        engine_dir.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _manifest_for_loaded(model: nn.Module, src: Path) -> dict:
    if (src / engine_dir.MANIFEST_NAME).is_file():
        return engine_dir.read_manifest(src)
    recipe = recipe_of(model)
    return {"identity": {"format_version": engine_dir.FORMAT_VERSION, "source": source_description(src),
                         "recipe": recipe.to_dict(), "calibration": None,
                         "versions": {"torch": torch.__version__, "optimum_nvidia": project_version()}},
            "model_name": src.name, "source_dir": str(src)}


def load_engine(engine_path: Path, dtype: torch.dtype, device: torch.device | str, verify: bool = True) -> nn.Module:
    """Load a verified engine dir: the model with Fp8Linear modules where it was quantized, and its KV scales.

    Raises EngineDirError for a partial or corrupted directory (never loads one)."""
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoConfig

    from optimum_nvidia_core.models.loader import build_model

    engine_path, device = Path(engine_path), torch.device(device)
    manifest = engine_dir.verify_engine_dir(engine_path) if verify else engine_dir.read_manifest(engine_path)
    recipe = Fp8Recipe.from_dict(manifest["identity"]["recipe"])
    if recipe.use_fp8 or recipe.kv_cache_dtype == "fp8":
        check_fp8_supported(device)
    hf_config = AutoConfig.from_pretrained(engine_path, trust_remote_code=False)
    model = build_model(hf_config, dtype, device)
    swap_in_empty_fp8(model, recipe, dtype, device)
    load_safetensors_into(model, str(engine_path / WEIGHTS_NAME), strict=True, device=str(device))
    scales = manifest.get("kv_scales")
    if scales:
        set_kv_scales(model, scales["k"], scales["v"])
    return model.eval()
