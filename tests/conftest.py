"""Shared fixtures: tiny random LLaMA-family checkpoints, the real SmolLM2 directory, a minimal paged-KV runner.

Unit tests (tests/unit) run with network sockets disabled: nothing there may reach the network.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
_TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. Paris is the capital of France; Berlin is the capital
of Germany. def add(a, b): return a + b. {"name": "get_weather", "arguments": {"city": "Paris"}} 0123456789
Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, emoji \U0001F600. Once upon a time there was a small model that
liked to answer questions about the weather, numbers, cities and code."""


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


# ---- tiny random checkpoints ------------------------------------------------------------------------------------

TINY_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
                 vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# family name -> (config class name, overrides); one per variant the model must handle
TINY_FAMILIES = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama_bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=1000000.0))),
    "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                          tie_word_embeddings=True)),
    "smollm2": ("LlamaConfig", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                    tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=100000.0))),
}


def tiny_config(family: str, **overrides):
    """A tiny transformers config of `family` (see TINY_FAMILIES)."""
    import transformers

    class_name, family_overrides = TINY_FAMILIES[family]
    config_class = getattr(transformers, class_name)
    config = config_class(**{**TINY_BASE, **family_overrides, **overrides})
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    return config


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with weights large enough that every layer shapes the logits (fp32)."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def write_tiny_checkpoint(out_dir: Path, family: str = "llama3", seed: int = 0, **overrides):
    """Save a tiny random `family` model (transformers, safetensors) into out_dir; returns (out_dir, hf_model)."""
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir), model


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer trained on a few lines, ChatML template, <|im_end|> as EOS (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(str(out_dir))


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
        from optimum_nvidia_core.layers.attention_metadata import AttentionMetadata

        input_ids, positions, slots, query_lens, context_lens, tables = [], [], [], [], [], []
        for seq_id, tokens in chunks:
            start = self.lengths.get(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free_blocks.pop())
            for pos in range(start, start + len(tokens)):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            context_lens.append(start + len(tokens))
            tables.append(table)
            self.lengths[seq_id] = start + len(tokens)
        width = max(len(t) for t in tables)
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)  # noqa: E731
        attn = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            query_start_loc=as_tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), torch.int32),
            context_lens=as_tensor(context_lens, torch.int32),
            block_tables=as_tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            max_query_len=max(query_lens), max_context_len=max(context_lens),
            query_lens_host=query_lens, context_lens_host=context_lens,
        )
        hidden = self.model(as_tensor(input_ids, torch.int64), as_tensor(positions, torch.int64), attn)
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
