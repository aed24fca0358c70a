"""Build, save and load engines: load the source model, calibrate, quantize, write an engine directory.

    build_fp8_engine(model_dir, config, out_dir)             # load -> calibrate -> quantize -> save
    save_engine(model, tokenizer_src_dir, out_dir, manifest)  # atomic: temp dir, checksums, rename
    load_engine(engine_dir, dtype, device)                    # verified; Fp8Linear modules + KV scales
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from optimum_nvidia_core import cache_dir
from optimum_nvidia_core.build import calibration, engine_dir
from optimum_nvidia_core.build.int4 import Int4Recipe, int4_recipe_of, swap_in_empty_int4
from optimum_nvidia_core.build.quantize import (
    Fp8Recipe, check_fp8_supported, kv_scales, quantize_model, set_kv_scales, swap_in_empty_fp8,
)
from optimum_nvidia_core.devices import pick_device, pick_dtype
from optimum_nvidia_core.layers.fp8_linear import Fp8Linear

WEIGHTS_NAME = "model.safetensors"
# Source files that are weights (re-written by us) or ours; everything else (config, tokenizer, chat template,
# generation config) is copied into the engine so it loads on its own.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".index.json", ".lock")


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


def source_description(model_dir: Path) -> dict:
    """The source's identity in the cache key: the content hash of every file (build/source_fingerprint.py)."""
    from optimum_nvidia_core.build.source_fingerprint import fingerprints

    paths = [p for p in sorted(Path(model_dir).iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != engine_dir.MANIFEST_NAME]
    # A Hugging Face snapshot dir is named by its commit: that is the resolved revision.
    revision = model_dir.name if model_dir.parent.name == "snapshots" else None
    return {"revision": revision, "files": fingerprints(paths)}


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
    """Calibrate (if the recipe needs it) and quantize ``model_dir`` into an engine at ``out_dir``.

    A safetensors checkpoint is built one decoder layer at a time (build/streaming.py: peak GPU memory is about one
    high-precision layer); pickle (.bin) checkpoints are loaded whole first."""
    from transformers import AutoTokenizer

    from optimum_nvidia_core.hub import weight_files
    from optimum_nvidia_core.models.fp8_formats import checkpoint_format

    model_dir = Path(model_dir)
    fmt = checkpoint_format(model_dir)
    if fmt is not None:
        raise ValueError(f"{model_dir} is already an FP8 checkpoint ({fmt.producer}); there is nothing to build: "
                         "serve it as it is with LLM(path)")
    config, manifest = prepare_build(model_dir, config)
    recipe = Fp8Recipe.from_config(config)
    device, dtype = resolve_device_dtype(config)
    if recipe.use_fp8 or recipe.kv_cache_dtype == "fp8":
        check_fp8_supported(device)
    token_lists = None
    if recipe.needs_calibration:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        token_lists = calibration.tokenize_samples(tokenizer, config.calibration_dataset,
                                                   config.calibration_max_length)
    if all(f.suffix == ".safetensors" for f in weight_files(model_dir, config.allow_pickle_weights)):
        from optimum_nvidia_core.build.streaming import build_streaming

        return write_engine_dir(model_dir, out_dir, manifest, lambda tmp: build_streaming(
            model_dir, recipe, token_lists, dtype, device, tmp))
    from optimum_nvidia_core.models.loader import load_model

    model = load_model(model_dir, dtype, device, allow_pickle=config.allow_pickle_weights)
    quantize_model(model, recipe, token_lists)
    return save_engine(model, model_dir, out_dir, manifest)


def recipe_of(model: nn.Module) -> Fp8Recipe:
    """The recipe a (possibly quantized) model was built with, read from its modules (our builds, or a
    pre-quantized checkpoint: there every linear may have a static scale, down_proj included)."""
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    k, v = kv_scales(model) if hasattr(model.attention_layers()[0], "k_scale") else ([1.0], [1.0])
    static = any(m.input_scale is not None for m in fp8.values())
    dynamic = sorted({name.rsplit(".", 1)[-1] for name, m in fp8.items() if m.input_scale is None})
    first = next(iter(fp8.values()), None)
    return Fp8Recipe(
        use_fp8=bool(fp8),
        weight_scale="channel" if first is None or first.per_channel else "tensor",
        activation_scheme="static" if not fp8 or static else "dynamic",
        kv_cache_dtype="fp8" if any(s != 1.0 for s in k + v) else "auto",
        dynamic_linears=tuple(dynamic) if static else Fp8Recipe.dynamic_linears,
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

    src = Path(tokenizer_src_dir)
    if manifest is None:
        manifest = _manifest_for_loaded(model, src)

    def write_weights(tmp: Path) -> dict:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        k, v = kv_scales(model)
        return {"k": k, "v": v}

    return write_engine_dir(src, out_dir, manifest, write_weights)


def write_engine_dir(src_dir: Path, out_dir: Path, manifest: dict, write_weights) -> Path:
    """The one way an engine directory is written: ``write_weights(tmp_dir) -> kv_scales`` writes the weights into a
    temp dir next to ``out_dir``, the support files of ``src_dir`` and the manifest follow, then one rename."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    manifest = {k: v for k, v in manifest.items() if k not in ("files", "checksum", "created")}
    tmp = cache_dir.temp_dir_for(out_dir)
    try:
        _copy_support_files(Path(src_dir), tmp)
        manifest["kv_scales"] = write_weights(tmp)
        engine_dir.finalize_engine_dir(tmp, manifest)
        engine_dir.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """Only an engine directory of ours, holding nothing but its own files, may be replaced: a folder that merely
    has a manifest.json, or an engine dir the user put files of their own into, is refused (never deleted)."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    try:
        listed = set(engine_dir.read_manifest(out_dir)["files"])
    except (engine_dir.EngineDirError, NotADirectoryError) as exc:
        raise FileExistsError(f"{out_dir} exists and is not an engine directory ({exc}); nothing was changed: pass "
                              "a new or empty directory") from None
    ours = listed | {engine_dir.MANIFEST_NAME}
    extra = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                   if not p.is_dir() and p.relative_to(out_dir).as_posix() not in ours
                   and not p.name.startswith(engine_dir.STAMP_NAME))
    if extra:
        raise FileExistsError(f"{out_dir} is an engine directory but also holds files that are not the engine's "
                              f"({', '.join(extra[:5])}); move them out, or pass a new or empty directory")


def _manifest_for_loaded(model: nn.Module, src: Path) -> dict:
    if (src / engine_dir.MANIFEST_NAME).is_file():
        return engine_dir.read_manifest(src)
    recipe = recipe_of(model).to_dict()
    int4 = int4_recipe_of(model)  # e.g. a loaded AWQ / GPTQ checkpoint
    if int4 is not None:
        recipe.update(int4.to_dict(), kv_cache_dtype=recipe["kv_cache_dtype"])
    return {"identity": {"format_version": engine_dir.FORMAT_VERSION, "source": source_description(src),
                         "recipe": recipe, "calibration": None,
                         "versions": {"torch": torch.__version__, "optimum_nvidia": project_version()}},
            "model_name": src.name, "source_dir": str(src)}


def load_engine(engine_path: Path, dtype: torch.dtype, device: torch.device | str, verify: bool = True,
                timings: dict | None = None) -> nn.Module:
    """Load a verified engine dir: the model with Fp8Linear modules where it was quantized, and its KV scales.

    The model is laid out on the meta device and each saved tensor becomes its parameter directly, so loading
    never holds more than the engine's own weights (a 70B FP8 engine loads on one 141 GB GPU). Raises
    EngineDirError for a partial or corrupted directory (never loads one). ``timings``: filled with the seconds of
    each part (verify_s, layout_s, weights_s; benchmarks/build_bench.py reports them)."""
    from transformers import AutoConfig

    from optimum_nvidia_core.models.loader import build_model

    engine_path, device = Path(engine_path), torch.device(device)
    clock = _Clock(timings, device)
    manifest = engine_dir.verify_engine_dir(engine_path) if verify else engine_dir.read_manifest(engine_path)
    clock.lap("verify_s")
    recipe = Fp8Recipe.from_dict(manifest["identity"]["recipe"])
    if recipe.use_fp8 or recipe.kv_cache_dtype == "fp8":
        check_fp8_supported(device)
    hf_config = AutoConfig.from_pretrained(engine_path, trust_remote_code=False)
    model = build_model(hf_config, dtype, "meta")
    meta = torch.device("meta")
    swap_in_empty_fp8(model, recipe, dtype, meta)
    int4 = Int4Recipe.from_dict(manifest["identity"]["recipe"])
    if int4 is not None:
        swap_in_empty_int4(model, int4, dtype, meta)
    clock.lap("layout_s")
    assign_saved_tensors(model, engine_weight_files(engine_path), device)
    scales = manifest.get("kv_scales")
    if scales:
        set_kv_scales(model, scales["k"], scales["v"])
    clock.lap("weights_s")
    return model.eval()


class _Clock:
    """Seconds between laps into ``timings`` (nothing when it is None); on CUDA each lap waits for the device."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device = timings, device
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now


def engine_weight_files(engine_path: Path) -> list[Path]:
    """model.safetensors (whole-model builds and saves), or the shards of a layer-by-layer build."""
    from optimum_nvidia_core.build.streaming import INDEX_NAME

    if (engine_path / WEIGHTS_NAME).is_file():
        return [engine_path / WEIGHTS_NAME]
    index = engine_path / INDEX_NAME
    if not index.is_file():
        raise engine_dir.EngineDirError(f"{engine_path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; rebuild it")
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if any(Path(n).name != n for n in names):
        raise engine_dir.EngineDirError(f"{index} names files outside the engine directory; rebuild the engine")
    return [engine_path / n for n in names]


@torch.no_grad()
def assign_saved_tensors(model: nn.Module, files: list[Path], device: torch.device) -> None:
    """Make each tensor of ``files`` the parameter/buffer of its name in ``model`` (on the meta device), cast to the
    model's dtype for it. Every tensor of the model must be given exactly once (tied embeddings: either name)."""
    from safetensors.torch import load_file

    from optimum_nvidia_core.build.safetensors_reader import load_to_device

    expected = model.state_dict()  # meta tensors: names, shapes and dtypes
    tied = getattr(model, "tie_word_embeddings", False)
    seen, unexpected = set(), []
    for file in files:
        # On the GPU: one read through pinned buffers. On the CPU, safetensors' memory map costs nothing until used.
        state = load_to_device(file, device) if device.type == "cuda" else load_file(str(file), device=str(device))
        if tied and "lm_head.weight" in state:
            state.setdefault("model.embed_tokens.weight", state.pop("lm_head.weight"))
        for name, tensor in state.items():
            if name not in expected or tuple(tensor.shape) != tuple(expected[name].shape):
                unexpected.append(name)
                continue
            state[name] = tensor.to(expected[name].dtype)
        model.load_state_dict({n: t for n, t in state.items() if n not in unexpected}, strict=False, assign=True)
        seen.update(state)
    missing = set(expected) - seen - ({"lm_head.weight"} if tied else set())
    if missing or unexpected:
        raise engine_dir.EngineDirError(
            f"engine weights do not match the model: missing {sorted(missing)[:5]}, unexpected or misshapen "
            f"{sorted(unexpected)[:5]}; rebuild the engine")
    model.tie_weights()
