"""Hugging Face INT4 checkpoints (AWQ "gemm", GPTQ) read into layers.int4_linear's format.

Both store, per quantized linear of in_features K and out_features N, with group size G:
  AWQ (AutoAWQ GEMM)  qweight int32 [K, N/8]  eight output columns per word, nibble i holding column 8c + AWQ_ORDER[i]
                      qzeros  int32 [K/G, N/8] packed the same way; scales [K/G, N]; W = (q - z) * s
  GPTQ                qweight int32 [K/8, N]  eight input rows per word, nibble i holding row 8r + i
                      qzeros  int32 [K/G, N/8] nibble i holding column 8c + i; scales [K/G, N]; g_idx int32 [K]
                      checkpoint_format "gptq" (v1, the common one) stores z - 1; "gptq_v2" stores z.
We keep output channels as rows ([N, K/8] packed along K), so each tensor converts on its own as it streams by
and the loader's usual checks (names, shapes, nothing missing) apply unchanged.

Supported: 4 bits, AWQ version "gemm" with zero points, GPTQ with desc_act false (g_idx = k // G) or one group per
row, symmetric or with zero points. Anything else raises with what is unsupported and what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..layers.int4_linear import MAX_CODE, PACK, Int4Linear, pack_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) held by nibble i of an AWQ word


class UnsupportedQuantization(ValueError):
    """The checkpoint's quantization_config asks for something this engine cannot run."""


@dataclass(frozen=True)
class Int4CheckpointFormat:
    method: str  # "awq" | "gptq"
    group_size: int  # -1: one group per row
    zero_offset: int = 0  # added to stored zeros (GPTQ v1 stores zero - 1)
    modules_to_not_convert: tuple[str, ...] = ()

    def converted(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint (name, tensor) pairs -> the names and layouts of Int4Linear (others pass through)."""
        for name, tensor in tensors:
            stem, _, leaf = name.rpartition(".")
            if leaf == "qweight":
                yield name, self._qweight(tensor)
            elif leaf == "qzeros":
                yield f"{stem}.zeros", self._zeros(tensor)
            elif leaf == "scales":
                yield name, tensor.t().contiguous()
            elif leaf == "g_idx":
                check_sequential_groups(name, tensor, self.group_size)
            else:
                yield name, tensor

    def _qweight(self, packed: torch.Tensor) -> torch.Tensor:
        if self.method == "awq":  # [K, N/8] packed along N -> codes [K, N] -> ours
            return pack_codes(unpack_columns(packed, AWQ_ORDER).t())
        return packed.t().contiguous()  # GPTQ [K/8, N] is ours transposed: nibble i of word r is row 8r + i

    def _zeros(self, packed: torch.Tensor) -> torch.Tensor:
        order = AWQ_ORDER if self.method == "awq" else tuple(range(PACK))
        zeros = (unpack_columns(packed, order).to(torch.int32) + self.zero_offset) & MAX_CODE
        return zeros.t().contiguous().to(torch.uint8)


def unpack_columns(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C/8] packed along columns (nibble i of word c = column 8c + order[i]) -> uint8 [R, C]."""
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & MAX_CODE  # [R, C/8, 8], by nibble
    columns = torch.empty_like(nibbles)
    columns[:, :, list(order)] = nibbles  # nibble i -> column order[i]
    return columns.reshape(packed.shape[0], -1).to(torch.uint8)


def check_sequential_groups(name: str, g_idx: torch.Tensor, group_size: int) -> None:
    in_features = g_idx.numel()
    size = in_features if group_size == -1 else group_size
    expected = torch.arange(in_features, dtype=torch.int64) // size
    if not torch.equal(g_idx.to(torch.int64).cpu(), expected):
        raise UnsupportedQuantization(
            f"{name} reorders input channels (GPTQ act-order / desc_act=True): not supported. Use a checkpoint "
            "quantized with desc_act=False, or the bf16 checkpoint with quantization='int4'.")


def _config_dict(hf_config) -> dict | None:
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def checkpoint_format(hf_config) -> Int4CheckpointFormat | None:
    """The INT4 format a checkpoint's config.json declares, or None if it declares no AWQ/GPTQ quantization."""
    config = _config_dict(hf_config)
    method = (config or {}).get("quant_method")
    if method not in ("awq", "gptq"):
        return None
    bits = config.get("bits", config.get("w_bit"))
    group_size = int(config.get("group_size", config.get("q_group_size", 128)))
    problems = [f"bits={bits} (only 4)"] if bits != 4 else []
    skip = tuple(config.get("modules_to_not_convert") or ())
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            problems.append(f"version={version!r} (only 'gemm'; GEMV, Marlin and ExLlama layouts are not read)")
        if not config.get("zero_point", True):
            problems.append("zero_point=False (only AWQ with zero points)")
        fmt = Int4CheckpointFormat("awq", group_size, 0, skip)
    else:
        if config.get("desc_act"):
            problems.append("desc_act=True (act-order reorders input channels; only desc_act=False)")
        checkpoint = config.get("checkpoint_format", "gptq")
        if checkpoint not in ("gptq", "gptq_v2"):
            problems.append(f"checkpoint_format={checkpoint!r} (only 'gptq' and 'gptq_v2')")
        fmt = Int4CheckpointFormat("gptq", group_size, 1 if checkpoint == "gptq" else 0, skip)
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        problems.append(f"group_size={group_size} (a multiple of 32, or -1)")
    if problems:
        raise UnsupportedQuantization(
            f"This {method.upper()} checkpoint uses {', '.join(problems)}, which this engine does not run. Use a "
            "4-bit AWQ (GEMM) or GPTQ (desc_act=False) checkpoint, or the bf16 checkpoint with quantization='int4'.")
    return fmt


def swap_in_int4(model: nn.Module, fmt: Int4CheckpointFormat, dtype: torch.dtype, device) -> None:
    """Replace the linears the checkpoint quantized by empty Int4Linear modules (the loader then fills them)."""
    from ..layers.linear import Linear

    parts: dict[str, list[str]] = {}
    for part, (fused, _) in model.packed_modules.items():
        parts.setdefault(fused, []).append(part)
    names = [name for name, module in model.named_modules() if isinstance(module, Linear) and name != "lm_head"]
    for name in names:
        owner, _, leaf = name.rpartition(".")
        hf_names = [f"{owner}.{part}" for part in parts.get(leaf, [leaf])]
        skipped = [any(key in hf for key in fmt.modules_to_not_convert) for hf in hf_names]
        if all(skipped):
            continue
        if any(skipped):
            raise UnsupportedQuantization(
                f"modules_to_not_convert keeps only some of {hf_names} in high precision; this engine fuses them "
                "into one projection, which must be all quantized or all not")
        model.set_submodule(name, Int4Linear.like(model.get_submodule(name), fmt.group_size, dtype, device))
