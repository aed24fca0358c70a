"""Checkpoint directory -> our LlamaForCausalLM, without building a transformers model.

The module is built on the meta device (no memory), materialized empty on the target device in the target dtype,
then filled by streaming the checkpoint tensor by tensor (single file or sharded through
model.safetensors.index.json): at most one checkpoint tensor is on the host at a time. Separate q/k/v and
gate/up tensors are copied into their row slices of the fused projections.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from ..hub import SUPPORTED_ARCHITECTURES, ModelResolutionError, check_model_dir, read_config_dict, weight_files
from .llama import LlamaForCausalLM

_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer that old checkpoints saved; we recompute it


def load_config(model_dir: Path, allow_pickle: bool = False):
    """transformers config of a checked LLaMA-family directory (auto_map / remote code is never used)."""
    from transformers import AutoConfig

    check_model_dir(Path(model_dir), allow_pickle)
    check_config_sizes(read_config_dict(Path(model_dir)), Path(model_dir) / "config.json")
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")


def check_config_sizes(config: dict, where: Path) -> None:
    """A ModelResolutionError naming the field of config.json whose size cannot build a model, before transformers
    or torch fail on it with a raw error (a ZeroDivisionError, a negative tensor dimension)."""
    def size(name: str) -> int | None:  # None: not given, transformers' default applies
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelResolutionError(f"{where}: {name} must be a positive integer, got {value!r}. Fix it (it must "
                                       "match the checkpoint's weights), or use the original checkpoint's config.json")
        return value

    sizes = {name: size(name) for name in _POSITIVE_SIZES}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    kv_heads = size("num_key_value_heads") or heads
    if heads and kv_heads and heads % kv_heads:
        raise ModelResolutionError(f"{where}: num_attention_heads ({heads}) must be a multiple of "
                                   f"num_key_value_heads ({kv_heads}); fix config.json")
    if size("head_dim") is None and heads and hidden and hidden % heads:
        raise ModelResolutionError(f"{where}: hidden_size ({hidden}) must be a multiple of "
                                   f"num_attention_heads ({heads}) when head_dim is not given; fix config.json")


def build_model(config, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """Our model with uninitialized weights of `dtype` on `device`: fill them before use (load_weights)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise ValueError(f"Unsupported architecture {architectures}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=torch.device(device))
    model.tie_weights()  # to_empty gives each module its own tensor: share the embedding again
    return model.eval()


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device | str,
               allow_pickle: bool = False) -> LlamaForCausalLM:
    """Build our model for `model_dir` and stream its weights onto `device` as `dtype`."""
    from .int4_formats import checkpoint_format, swap_in_int4

    config = load_config(model_dir, allow_pickle)
    model = build_model(config, dtype, device)
    tensors = checkpoint_tensors(Path(model_dir), allow_pickle)
    int4 = checkpoint_format(config)  # an AWQ / GPTQ checkpoint: Int4Linear modules, tensors converted as they stream
    if int4 is not None:
        swap_in_int4(model, int4, dtype, device)
        tensors = int4.converted(tensors)
    try:
        load_weights(model, tensors, total=_count_tensors(Path(model_dir)))
    except ModelResolutionError:
        raise  # already says what is wrong with which file
    except ValueError as exc:
        if _has_fused_weights(Path(model_dir), allow_pickle):
            raise ModelResolutionError(_engine_without_manifest(Path(model_dir))) from exc
        raise
    return model


def _has_fused_weights(model_dir: Path, allow_pickle: bool) -> bool:
    """Whether the weights use our fused layout (qkv_proj, gate_up_proj): an engine directory's, never a Hugging
    Face LLaMA-family checkpoint's. Reads only safetensors headers."""
    from safetensors import safe_open

    fused = {f".{name}." for name, _ in LlamaForCausalLM.packed_modules.values()}
    for file in _weight_files_in_order(model_dir, allow_pickle):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                if any(part in key for key in reader.keys() for part in fused):
                    return True
    return False


def _engine_without_manifest(model_dir: Path) -> str:
    manifest = model_dir / "manifest.json"
    state = "unreadable (a broken or looping link, or not a file)" if os.path.lexists(manifest) else "missing"
    return (f"{model_dir} is an engine directory (its weights are in the engine's fused layout) whose manifest.json "
            f"is {state}, so it cannot be verified and is not loaded. Save or build the engine again "
            "(LLM(model).save(dir), or `optimum-nvidia build MODEL --output DIR`), or load the original checkpoint")


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]], total: int | None = None,
                 prefix: str | tuple[str, ...] = "", progress: bool | None = None):
    """Copy (checkpoint name, tensor) pairs into `model`; raise if a weight is missing or unknown.

    ``prefix``: fill (and require) only the parameters under it (or under any of a tuple of prefixes), e.g.
    "model.layers.3." (layer-by-layer builds)."""
    from tqdm.auto import tqdm

    params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefix)}
    pending = {part for part in _expected_parts(model) if part[0].startswith(prefix)}
    unexpected = []
    disable = None if progress is None else not progress  # None: a bar on a terminal only
    for name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=disable):
        target = _our_name(name, model)
        if target is None:
            continue
        param_name, shard = target
        if param_name not in params:
            unexpected.append(name)
            continue
        param = params[param_name]
        rows = _shard_rows(model, param_name, shard)
        destination = param if rows is None else param[rows]
        if tuple(destination.shape) != tuple(tensor.shape):
            raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(destination.shape)}: config.json does not match the weights")
        destination.copy_(tensor)  # casts to the model dtype and moves to its device
        pending.discard((param_name, shard))
    if model.tie_word_embeddings:
        pending.discard(("lm_head.weight", 0))
    if unexpected or pending:
        raise ValueError(
            f"Checkpoint does not match the model: unknown tensors {unexpected[:5]}, missing "
            f"{sorted(pending)[:5]}. Check that config.json belongs to these weights."
        )


def checkpoint_tensors(model_dir: Path, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs, one at a time, from every weight file of the checkpoint."""
    for file in _weight_files_in_order(model_dir, allow_pickle):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                reader = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # SafetensorError: header or size does not match the file
                raise ModelResolutionError(
                    f"{file} is truncated or corrupted ({exc}); download or copy it again") from exc
            with reader:
                for name in reader.keys():
                    yield name, reader.get_tensor(name)
        else:  # pickle: only reached with allow_pickle=True; weights_only refuses arbitrary objects anyway
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


def _weight_files_in_order(model_dir: Path, allow_pickle: bool) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file() and (index_name.endswith("safetensors.index.json") or allow_pickle):
            weight_map = json.loads(index.read_text())["weight_map"]
            return [_file_inside(model_dir, name, index) for name in sorted(set(weight_map.values()))]
    return weight_files(model_dir, allow_pickle)


def _file_inside(model_dir: Path, name: str, index: Path) -> Path:
    """A weight file named by the index, refused unless it is a plain file name inside model_dir. The entry there
    may be a link (the Hugging Face cache links each shard to its blob; a big checkpoint may link shards kept on
    another disk): whoever owns the directory put it there, unlike a name in the index that climbs out of it."""
    path = model_dir / name
    if Path(name).name != name or name in (".", ".."):
        raise ModelResolutionError(
            f"{index} lists weight file {name!r}, which is outside the checkpoint directory. Weight files must be "
            "plain file names in the same directory: fix or regenerate the index."
        )
    if not path.is_file():
        raise ModelResolutionError(f"{index} lists weight file {name!r}, which is missing from {model_dir}. "
                                   "Copy the missing shard into the directory.")
    return path


def _count_tensors(model_dir: Path) -> int | None:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return len(json.loads(index.read_text())["weight_map"])
    return None


# ---- name mapping: Hugging Face checkpoint <-> ours -----------------------------------------------------------


def _our_name(name: str, model: LlamaForCausalLM) -> tuple[str, int] | None:
    """'model.layers.0.self_attn.k_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 1); None = skip."""
    if _IGNORED_KEYS.match(name) or (name == "lm_head.weight" and model.tie_word_embeddings):
        return None
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in model.packed_modules:
        fused, shard = model.packed_modules[parts[-2]]
        return ".".join(parts[:-2] + [fused, parts[-1]]), shard
    return name, 0


def _shard_rows(model: LlamaForCausalLM, param_name: str, shard: int) -> slice | None:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    sizes = getattr(module, "output_sizes", None)
    return module.shard_rows(shard) if sizes and len(sizes) > 1 else None


def _expected_parts(model: LlamaForCausalLM) -> set[tuple[str, int]]:
    expected = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        num_parts = len(getattr(module, "output_sizes", [None]))
        expected.update((name, shard) for shard in range(num_parts))
    return expected
