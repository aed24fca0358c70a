"""FP8 engine build: quantization, calibration, engine directories and their cache.

    get_or_build(model_dir, config, build_fn=build_fp8_engine) -> Path   # cached under the manifest's key, locked
    build_fp8_engine(model_dir, config, out_dir) -> Path                 # load, calibrate, quantize, save
    save_engine(model, tokenizer_src_dir, out_dir, manifest=None) -> Path
    load_engine(engine_dir, dtype, device) -> model                      # verified by checksums first
    quantize_model(model, recipe, calib_token_lists) -> model            # swap Linear -> Fp8Linear in place
    perplexity(model, token_ids, kv_cache_dtype="auto") -> float
"""
from optimum_nvidia_core.build.builder import build_fp8_engine, load_engine, make_manifest, save_engine
from optimum_nvidia_core.build.engine_cache import engine_cache_root, get_or_build
from optimum_nvidia_core.build.engine_dir import EngineDirError, cache_key, read_manifest, verify_engine_dir
from optimum_nvidia_core.build.perplexity import perplexity
from optimum_nvidia_core.build.quantize import Fp8Recipe, check_fp8_supported, quantize_model

__all__ = [
    "EngineDirError", "Fp8Recipe", "build_fp8_engine", "cache_key", "check_fp8_supported", "engine_cache_root",
    "get_or_build", "load_engine", "make_manifest", "perplexity", "quantize_model", "read_manifest", "save_engine",
    "verify_engine_dir",
]
