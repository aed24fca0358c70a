"""Our LLaMA-family model against transformers on the same weights (tiny random configs, fp32, CPU).

Every family runs through the paged KV cache with a hand-built AttentionMetadata: a full prefill, then a
chunked prefill mixed with another sequence's decodes, then decode steps; each token's logits must match
transformers' logits at that position.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.checkpoint import hf_weight_shapes, write_random_checkpoint
from optimum_nvidia_core.models.loader import build_model, checkpoint_tensors, load_model, load_weights

FAMILIES = ["llama2", "llama3", "llama_bias", "mistral", "qwen2", "qwen2_sliding", "smollm2"]
SEQ_A = [(13 * i + 5) % 500 + 3 for i in range(23)]  # longer than the sliding window (8) and 5 blocks of 4
SEQ_B = [(7 * i + 11) % 500 + 3 for i in range(17)]


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()  # [L, vocab]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    assert scale > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_prefill_matches_transformers(family, tiny_checkpoint, paged_runner):
    path, hf_model = tiny_checkpoint(family)
    model = load_model(path, torch.float32, "cpu")
    runner = paged_runner(model, num_blocks=32, block_size=4)
    logits = runner.step([(0, SEQ_A), (1, SEQ_B)])  # two sequences in one flat batch
    assert_close(logits[: len(SEQ_A)], reference_logits(hf_model, SEQ_A))
    assert_close(logits[len(SEQ_A):], reference_logits(hf_model, SEQ_B))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_transformers(family, tiny_checkpoint, paged_runner):
    path, hf_model = tiny_checkpoint(family)
    model = load_model(path, torch.float32, "cpu")
    runner = paged_runner(model, num_blocks=32, block_size=4)
    ref_a, ref_b = reference_logits(hf_model, SEQ_A), reference_logits(hf_model, SEQ_B)

    # Step 1: A's first chunk with B's whole prompt but its last 6 tokens.
    logits = runner.step([(0, SEQ_A[:5]), (1, SEQ_B[:11])])
    assert_close(logits[:5], ref_a[:5])
    assert_close(logits[5:], ref_b[:11])
    # Step 2: A's second chunk (crosses blocks) mixed with one B decode.
    logits = runner.step([(0, SEQ_A[5:14]), (1, SEQ_B[11:12])])
    assert_close(logits[:9], ref_a[5:14])
    assert_close(logits[9:], ref_b[11:12])
    # Decode steps: one token each, both sequences in the same batch, past the sliding window.
    for pos_a, pos_b in zip(range(14, 23), range(12, 17)):
        logits = runner.step([(1, SEQ_B[pos_b:pos_b + 1]), (0, SEQ_A[pos_a:pos_a + 1])])
        assert_close(logits[0:1], ref_b[pos_b:pos_b + 1])
        assert_close(logits[1:2], ref_a[pos_a:pos_a + 1])


def test_greedy_generation_matches_transformers(tiny_checkpoint, paged_runner):
    path, hf_model = tiny_checkpoint("llama3")
    model = load_model(path, torch.float32, "cpu")
    prompts = [SEQ_A[:7], SEQ_B[:3], SEQ_A[4:16]]
    ours = paged_runner(model, num_blocks=64, block_size=4).greedy(prompts, max_new_tokens=12)
    for prompt, generated in zip(prompts, ours):
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        assert generated == expected[0, len(prompt):].tolist()


def test_fp8_kv_cache_stores_scaled_e4m3(tiny_checkpoint, paged_runner):
    """An FP8 cache holds round_e4m3(k / k_scale); reading multiplies the scale back."""
    path, hf_model = tiny_checkpoint("llama3")
    model = load_model(path, torch.float32, "cpu")
    runner = paged_runner(model, num_blocks=16, block_size=4, kv_dtype=torch.float8_e4m3fn)
    for layer in model.attention_layers():
        layer.k_scale = torch.tensor([0.05])
        layer.v_scale = torch.tensor([0.02])
    logits = runner.step([(0, SEQ_A[:10])])
    layer = model.attention_layers()[0]
    assert layer.k_cache.dtype == torch.float8_e4m3fn
    stored = layer.k_cache.float().abs().amax()
    assert 10.0 < stored <= 448.0  # values were divided by the small scale, not stored raw
    reference = reference_logits(hf_model, SEQ_A[:10])
    relative_error = (logits - reference).abs().max() / reference.abs().max()
    assert 0 < relative_error < 0.1  # e4m3 rounding: close to fp32, but not identical


def test_bfloat16_model_stays_close_to_fp32_reference(tiny_checkpoint, paged_runner):
    path, hf_model = tiny_checkpoint("llama3")
    model = load_model(path, torch.bfloat16, "cpu")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    logits = paged_runner(model, num_blocks=16, block_size=4).step([(0, SEQ_A[:12])])
    assert logits.dtype == torch.float32 and model.attention_layers()[0].k_cache.dtype == torch.bfloat16
    reference = reference_logits(hf_model, SEQ_A[:12])
    assert (logits - reference).abs().max() / reference.abs().max() < 0.05


def test_sharded_random_checkpoint_loads_and_matches_transformers(tmp_path, paged_runner):
    """write_random_checkpoint (no transformers model involved) + sharded index -> same logits as transformers."""
    import transformers

    from tiny_models import tiny_config

    config = tiny_config("qwen2")
    path = write_random_checkpoint(config, tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=200_000,
                                   std=0.15)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    hf_model = transformers.Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = load_model(path, torch.float32, "cpu")
    logits = paged_runner(model, num_blocks=16, block_size=4).step([(0, SEQ_A[:9])])
    assert_close(logits, reference_logits(hf_model, SEQ_A[:9]))


def test_hf_weight_shapes_follow_checkpoint_names():
    from tiny_models import tiny_config

    shapes = hf_weight_shapes(tiny_config("llama2"))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == (128, 64)
    assert shapes["lm_head.weight"] == (512, 64)
    tied = hf_weight_shapes(tiny_config("smollm2"))
    assert "lm_head.weight" not in tied and tied["model.layers.0.self_attn.k_proj.weight"] == (24, 72)


def test_fused_projections_and_tied_embeddings(tiny_checkpoint):
    path, hf_model = tiny_checkpoint("smollm2")
    model = load_model(path, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qkv = model.model.layers[0].self_attn.qkv_proj
    hf_attn = hf_model.model.layers[0].self_attn
    assert qkv.output_sizes == [72, 24, 24]
    assert torch.equal(qkv.weight[72:96], hf_attn.k_proj.weight)


def test_missing_tensor_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama2")
    model = build_model(__import__("transformers").AutoConfig.from_pretrained(path), torch.float32, "cpu")
    tensors = [(n, t) for n, t in checkpoint_tensors(path) if "layers.1.mlp.up_proj" not in n]
    with pytest.raises(ValueError, match="missing.*gate_up_proj"):
        load_weights(model, iter(tensors))


def test_shape_mismatch_is_a_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama2")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    config.intermediate_size = 96
    model = build_model(config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="config.json does not match the weights"):
        load_weights(model, checkpoint_tensors(path))


def test_unsupported_rope_type_is_refused(tiny_checkpoint):
    from tiny_models import tiny_config

    config = tiny_config("llama2", rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported; supported: default, linear, llama3"):
        build_model(config, torch.float32, "cpu")


def test_linear_rope_scaling_matches_transformers(tiny_checkpoint, paged_runner):
    path, hf_model = tiny_checkpoint("llama2", rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                    factor=2.0))
    model = load_model(path, torch.float32, "cpu")
    logits = paged_runner(model, num_blocks=16, block_size=4).step([(0, SEQ_B)])
    assert_close(logits, reference_logits(hf_model, SEQ_B))
