"""Random access to a safetensors checkpoint by tensor name, for builds that read one decoder layer at a time.

The files are memory-mapped (safetensors' safe_open), so reading one layer's tensors touches only those bytes: the
host never holds more than one layer of the source checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from ..hub import ModelResolutionError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer old checkpoints saved; the model recomputes it


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


class CheckpointReader:
    """Tensor names -> the memory-mapped file that holds them. Checked on opening: every tensor belongs to a decoder
    layer below ``num_layers`` or to the embeddings, final norm or LM head (anything else is an error, as in
    models.loader.load_weights)."""

    def __init__(self, model_dir: Path, num_layers: int):
        from safetensors import safe_open

        from ..models.loader import _weight_files_in_order

        self._where: dict[str, object] = {}
        for file in _weight_files_in_order(Path(model_dir), allow_pickle=False):
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # SafetensorError: header or size does not match the file
                raise ModelResolutionError(
                    f"{file} is truncated or corrupted ({exc}); download or copy it again") from exc
            self._where.update(dict.fromkeys(handle.keys(), handle))
        unknown = [name for name in self._where if not _IGNORED.match(name) and not self._known(name, num_layers)]
        if unknown:
            raise ValueError(f"Checkpoint does not match the model: unknown tensors {sorted(unknown)[:5]}. Check that "
                             "config.json belongs to these weights.")

    @staticmethod
    def _known(name: str, num_layers: int) -> bool:
        match = _LAYER.match(name)
        if match:
            return int(match.group(1)) < num_layers
        return name.split(".")[0] in ("model", "lm_head")

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self._where if n.startswith(prefix) and not _IGNORED.match(n))

    def tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, CPU tensor) for every tensor whose name starts with ``prefix``, one at a time."""
        for name in self.names(prefix):
            yield name, self._where[name].get_tensor(name)

    def non_layer_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The embeddings, the final norm and the LM head."""
        for name in sorted(self._where):
            if not _LAYER.match(name) and not _IGNORED.match(name):
                yield name, self._where[name].get_tensor(name)

