"""The LLaMA family in one file: Llama 2, Llama 3/3.1/3.2, Mistral, Qwen2, SmolLM2.

They differ only in configuration: grouped-query attention (num_key_value_heads), rope scaling (Llama 3.1's
"llama3"), tied input/output embeddings (SmolLM2, Llama 3.2 1B/3B), a sliding attention window (Mistral; Qwen2
on some layers) and biases on q/k/v (Qwen2; Llama's attention_bias). q/k/v and gate/up are fused projections;
the loader fills their row slices from the checkpoint's separate tensors (see `packed_modules`).

The model runs over a FLAT batch: T tokens from any mix of prefill chunks and decodes, laid out by an
AttentionMetadata, with K/V kept in the paged cache that each Attention layer holds.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.activation import SiluAndMul
from ..layers.attention import Attention
from ..attention_metadata import AttentionMetadata
from ..layers.embedding import LMHead, VocabEmbedding
from ..layers.fp8_linear import link_fused_quantization
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, rope_parameters


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_index: int) -> int | None:
    """The attention window of one layer, following transformers' rules for each family."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # transformers 5 (Qwen2 and newer configs): per-layer
        return window if layer_types[layer_index] == "sliding_attention" else None
    if getattr(config, "model_type", "") == "qwen2":  # older Qwen2 configs
        use = getattr(config, "use_sliding_window", False)
        return window if use and layer_index >= getattr(config, "max_window_layers", 0) else None
    if getattr(config, "model_type", "") == "mistral":
        return window
    return None


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        is_qwen2 = getattr(config, "model_type", "") == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=attention_bias or is_qwen2,
                               output_sizes=[q_size, kv_size, kv_size])
        self.o_proj = Linear(q_size, config.hidden_size, bias=attention_bias and not is_qwen2)
        self.rotary = RotaryEmbedding(self.head_dim, rope_parameters(config))
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              sliding_window=sliding_window_of(config, layer_index))
        self.split_sizes = [q_size, kv_size, kv_size]

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        # hidden [T, H] -> [T, H]
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (LLaMA-family models use 'silu')")
        inter, bias = config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias=bias, output_sizes=[inter, inter])
        self.down_proj = Linear(inter, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                attn: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: (hidden, residual) -> (hidden, residual), both [T, H].
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (our fused module name, part index); see Linear.output_sizes
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied embeddings (SmolLM2, Llama 3.2 1B/3B): the LM head reads the embedding matrix."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """input_ids [T], positions [T] (each token's index in its sequence) -> final hidden states [T, H]."""
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (usually only the rows that sample) -> logits [N, vocab] float32."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def fuse_fp8_input_quantization(self) -> None:
        """On the GPU, each norm and SiLU*mul then writes the e4m3 input of the FP8 linear after it (a no-op for
        bf16 linears). Call once the model sits on its device: the links hold the linears' scale tensors.
        SiLU*mul fuses only a static scale: a dynamic one needs a whole row per program, which measured slower
        at decode sizes (6.1 us vs 1.3 + 2.8 us for the two kernels, H100) than quantizing separately."""
        hidden, inter = self.config.hidden_size, self.config.intermediate_size
        for layer in self.model.layers:
            link_fused_quantization(layer.input_layernorm, layer.self_attn.qkv_proj, hidden)
            link_fused_quantization(layer.post_attention_layernorm, layer.mlp.gate_up_proj, hidden)
            link_fused_quantization(layer.mlp.act, layer.mlp.down_proj, inter, dynamic=False)
