"""From an EngineConfig to a model on its device: resolve the id, pick device and dtype, then load plain
weights (AWQ / GPTQ INT4 checkpoints included), a saved engine directory, or build (once, cached) an FP8 or INT4
engine."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EngineConfig
from ..devices import pick_device, pick_dtype

MANIFEST = "manifest.json"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    model_dir: Path  # where config.json and the tokenizer files are
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_seq_len: int
    eos_token_ids: list[int]
    vocab_size: int  # width of the logits
    model_name: str


def load(config: EngineConfig) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    from ..hub import resolve_model
    from ..build.fp8_checkpoint import load_fp8_checkpoint
    from ..models.fp8_formats import checkpoint_format
    from ..models.loader import load_model

    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    wants_fp8 = config.use_fp8 or config.kv_cache_dtype == "fp8"
    if wants_fp8:
        from ..build.quantize import check_fp8_supported

        check_fp8_supported(device)
    path = Path(config.model).expanduser()
    if (path / MANIFEST).is_file():
        from ..build import load_engine

        model_dir = path
        model = load_engine(path, dtype, device)
    else:
        model_dir = resolve_model(config.model, config.revision, allow_pickle=config.allow_pickle_weights)
        fp8_format = checkpoint_format(model_dir)  # a pre-quantized FP8 checkpoint is served as it is
        build = None if fp8_format is not None else _int4_build(model_dir, config)
        if build is None and wants_fp8 and fp8_format is None:
            from ..build import build_fp8_engine

            build = build_fp8_engine
        if fp8_format is not None:
            model = load_fp8_checkpoint(model_dir, fp8_format, dtype, device, config.kv_cache_dtype)
        elif build is not None:
            from ..build import get_or_build, load_engine

            engine_dir = get_or_build(model_dir, config, build)
            model = load_engine(engine_dir, dtype, device)
            model_dir = engine_dir
        else:
            model = load_model(model_dir, dtype, device, allow_pickle=config.allow_pickle_weights)
    if device.type == "cuda":  # part of building the model for the GPU: norms write the next FP8 linear's input
        model.fuse_fp8_input_quantization()
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    limit = int(getattr(hf_config, "max_position_embeddings", 4096))
    max_seq_len = min(config.max_seq_len or limit, limit)
    return LoadedModel(
        model=model, model_dir=model_dir, tokenizer=tokenizer, device=device, dtype=dtype, max_seq_len=max_seq_len,
        eos_token_ids=_eos_ids(model_dir, hf_config, tokenizer), vocab_size=int(hf_config.vocab_size),
        model_name=_model_name(config.model, model_dir),
    )


def _int4_build(model_dir: Path, config: EngineConfig):
    """build_int4_engine for quantization='int4' on a high-precision checkpoint; None for an AWQ/GPTQ checkpoint
    (already INT4: loaded as it is) or any other quantization."""
    from ..models.int4_formats import checkpoint_format
    from ..models.loader import load_config

    prequantized = checkpoint_format(load_config(model_dir, config.allow_pickle_weights))
    if prequantized is not None and config.use_fp8:
        raise ValueError(f"{model_dir} is a {prequantized.method.upper()} INT4 checkpoint; it cannot be "
                         "re-quantized to FP8. Drop use_fp8 (it loads as INT4), or use the bf16 checkpoint.")
    if prequantized is not None and config.kv_cache_dtype == "fp8":
        raise ValueError(f"kv_cache_dtype='fp8' needs calibrated K/V scales, which a {prequantized.method.upper()} "
                         "checkpoint does not carry; use kv_cache_dtype='auto', or the bf16 checkpoint with "
                         "quantization='int4', kv_cache_dtype='fp8'.")
    if prequantized is not None or config.quantization != "int4":
        return None
    from ..build.int4_build import build_int4_engine

    return build_int4_engine


def _eos_ids(model_dir: Path, hf_config: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id: generation_config's (Llama-3 lists <|eot_id|> there), config's, tokenizer's."""
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _model_name(model: str, model_dir: Path) -> str:
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        source = json.loads(manifest.read_text()).get("model_name")
        if source:
            return source
    return model if not Path(model).expanduser().exists() else Path(model).name
