"""Shared fixtures: tiny random LLaMA-family checkpoints, the real SmolLM2 directory, a minimal paged-KV runner.

Unit tests (tests/unit) run with network sockets disabled: nothing there may reach the network.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tiny_models import TINY_BASE, write_tiny_checkpoint, write_tiny_tokenizer

# ---- sockets off in unit tests ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_network_in_unit_tests(request, monkeypatch):
    if "unit" not in Path(str(request.node.fspath)).parts:
        return
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access is disabled in unit tests (tried to connect to {address!r})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A complete tiny model directory (Llama-3-style config, random weights, tokenizer, chat template) for
    engine tests that go through LLM(path)."""
    from transformers import GenerationConfig

    out_dir = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_checkpoint(out_dir, "llama3", seed=0)
    write_tiny_tokenizer(out_dir, vocab_size=TINY_BASE["vocab_size"])
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(family, **config_overrides) -> (dir, transformers model with the same weights)."""
    count = iter(range(1000))

    def make(family: str = "llama3", seed: int = 0, **overrides):
        return write_tiny_checkpoint(tmp_path / f"{family}-{next(count)}", family, seed, **overrides)

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory (HF cache, else converted once from the packaged GGUF)."""
    from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


# ---- a minimal paged-KV runner over our model (the engine's job, reduced to what model tests need) ----------------

class PagedRunner:
    """Drives LlamaForCausalLM over a paged KV cache: each step is a flat batch of (seq_id, new token ids) chunks.

    Blocks are handed out from the END of the pool, so logical and physical block order differ (paging is real).
    """

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, kv_dtype: torch.dtype | None = None):
        self.model, self.block_size = model, block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=kv_dtype or self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=kv_dtype or self.dtype, device=self.device)
        self.free_blocks = list(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @torch.no_grad()
    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """chunks [(seq_id, token ids)] -> logits [T, vocab] float32 for every token of the flat batch."""
        from optimum_nvidia_core.attention_metadata import AttentionMetadata

        input_ids, query_lens, context_lens, tables = [], [], [], []
        for seq_id, tokens in chunks:
            start = self.lengths.get(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free_blocks.pop())
            input_ids += tokens
            query_lens.append(len(tokens))
            context_lens.append(start + len(tokens))
            tables.append(table)
            self.lengths[seq_id] = start + len(tokens)
        positions, attn = AttentionMetadata.build(tables, query_lens, context_lens, self.block_size, self.device)
        input_ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, positions, attn)
        return self.model.compute_logits(hidden)

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None):
        """Greedy continuation of every prompt, all decoded together in one batch -> list of new token lists."""
        outputs = [[] for _ in prompts]
        last_rows = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        logits = self.step([(1000 + i, list(p)) for i, p in enumerate(prompts)])[last_rows]
        live = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            next_tokens = logits.argmax(-1).tolist()
            for i, token in zip(live, next_tokens):
                outputs[i].append(token)
            live = [i for i in live if outputs[i][-1] != eos_token_id and len(outputs[i]) < max_new_tokens]
            if not live:
                break
            logits = self.step([(1000 + i, [outputs[i][-1]]) for i in live])
        return outputs


@pytest.fixture
def paged_runner():
    """The PagedRunner class: paged_runner(model, num_blocks=64, block_size=4, kv_dtype=None)."""
    return PagedRunner
