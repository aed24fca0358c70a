"""INT4 engines: the build's recipe and manifest, and the build itself (load the high-precision model, calibrate,
quantize to INT4 with build/int4.py, save). Kept apart from build/int4.py (the format and the rounding), which the
FP8 builder and the engine loader import."""
from __future__ import annotations

from pathlib import Path

from optimum_nvidia_core.build.builder import make_manifest, resolve_device_dtype, save_engine
from optimum_nvidia_core.build.int4 import Int4Recipe, quantize_model_int4


def prepare_int4_build(model_dir: Path, config) -> tuple[object, dict]:
    """As builder.prepare_build, for INT4: materialized calibration samples and the manifest (recipe = Int4Recipe)."""
    from optimum_nvidia_core.build import calibration

    recipe = Int4Recipe.from_config(config)
    samples = None
    if recipe.needs_calibration:
        samples = calibration.select_calibration_samples(config.calibration_dataset, config.calibration_samples)
        config = config.model_copy(update={"calibration_dataset": samples})
    manifest = make_manifest(model_dir, config, samples)
    _, dtype = resolve_device_dtype(config)
    manifest["identity"]["recipe"] = {**recipe.to_dict(), "dtype": str(dtype).removeprefix("torch.")}
    return config, manifest


def build_int4_engine(model_dir: Path, config, out_dir: Path) -> Path:
    """Load the high-precision model, calibrate (if the method needs it), quantize to INT4, save to ``out_dir``."""
    from transformers import AutoTokenizer

    from optimum_nvidia_core.build import calibration
    from optimum_nvidia_core.build.quantize import check_fp8_supported
    from optimum_nvidia_core.models.loader import load_model

    model_dir = Path(model_dir)
    config, manifest = prepare_int4_build(model_dir, config)
    recipe = Int4Recipe.from_config(config)
    device, dtype = resolve_device_dtype(config)
    if recipe.kv_cache_dtype == "fp8":
        check_fp8_supported(device)
    model = load_model(model_dir, dtype, device)
    token_lists = None
    if recipe.needs_calibration:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        token_lists = calibration.tokenize_samples(tokenizer, config.calibration_dataset,
                                                   config.calibration_max_length)
    quantize_model_int4(model, recipe, token_lists)
    return save_engine(model, model_dir, out_dir, manifest)
