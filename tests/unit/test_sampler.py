"""Sampler: exact truncation masks, the sampled distribution, seeds that ignore the batch, penalties by hand."""
import math

import pytest
import torch

from optimum_nvidia_core.engine.sequence import Sequence
from optimum_nvidia_core.layers.sampler import (
    Sampler, SamplingBatch, apply_min_p, apply_penalties, apply_top_k_top_p, draw_from, seeded_uniform,
)
from optimum_nvidia_core.layers.sampling_table import sampling_batch
from optimum_nvidia_core.layers.token_bitmask import TokenBitmask
from optimum_nvidia_core.sampling_params import SamplingParams

EOS = 5


def seq(prompt=(1, 2, 3), output=(), seed=None, **params):
    s = Sequence("r", list(prompt), SamplingParams(**params), seed=seed)
    for t in output:
        s.append_token(t)
    return s


def sample(logits, seqs, **kwargs):
    batch = sampling_batch(seqs, "cpu", [EOS], **kwargs)
    return Sampler()(logits, batch)


def finite_set(row):
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_greedy_is_argmax_and_leaves_the_logits_alone():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = sample(logits, [seq(temperature=0.0) for _ in range(4)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert torch.equal(logits, before) and out.logprobs is None


def test_top_k_top_p_min_p_masks_are_exact():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # best-first: 1, 3, 2, 0
    logits = probs.log().repeat(5, 1)
    top_k = torch.tensor([0, 2, 0, 0, 1])
    top_p = torch.tensor([1.0, 1.0, 0.75, 0.85, 1.0])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    assert [finite_set(r) for r in masked] == [{0, 1, 2, 3}, {1, 3}, {1, 3}, {1, 2, 3}, {1}]
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2][[1, 3]], logits[2][[1, 3]])
    min_p = apply_min_p(logits[:3], torch.tensor([0.0, 0.2, 0.7]))  # thresholds 0, 0.1, 0.35
    assert [finite_set(r) for r in min_p] == [{0, 1, 2, 3}, {1, 2, 3}, {1}]


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.3, top_k=3), dict(top_p=0.8)])
def test_sampled_frequencies_match_the_truncated_distribution(params):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2])
    rows = 20_000
    seqs = [seq(seed=s, **params) for s in range(rows)]
    tokens = sample(logits.repeat(rows, 1), seqs).token_ids
    counts = torch.bincount(tokens, minlength=6).double() / rows
    p = SamplingParams(**params)
    scaled = (logits / p.temperature)[None]
    expected = apply_top_k_top_p(scaled, torch.tensor([p.top_k]), torch.tensor([p.top_p]))[0].softmax(-1).double()
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert torch.all((counts - expected).abs() <= 4.5 * sigma + 1e-9), (counts, expected)


def test_a_seed_draws_the_same_tokens_whatever_batch_it_shares():
    torch.manual_seed(0)
    vocab = 1000
    row = torch.randn(vocab)
    target = seq(prompt=range(7), seed=1234, temperature=1.0, top_p=0.9)
    alone = sample(row[None], [target]).token_ids.item()
    others = [seq(prompt=range(3 + i), seed=i, temperature=0.5 + i, top_k=i) for i in range(5)]
    batch_logits = torch.randn(6, vocab)
    batch_logits[3] = row
    mixed = sample(batch_logits, others[:3] + [target] + others[3:]).token_ids[3].item()
    assert mixed == alone
    # Different positions and different seeds draw different numbers.
    u = seeded_uniform(torch.tensor([1234, 1234, 99]), torch.tensor([7, 8, 7]))
    assert len(set(u.tolist())) == 3


def test_seeded_uniforms_are_uniform_and_uncorrelated():
    seeds = (torch.arange(256, dtype=torch.int64) * 1_000_003 + 2**40).repeat_interleave(256)
    positions = torch.arange(256).repeat(256)
    u = seeded_uniform(seeds, positions).view(256, 256)  # [seed, position]
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()) < 0.02
    assert torch.histc(u.float(), bins=16, min=0, max=1).sub(4096).abs().max() < 4 * 64  # 4 sigma per bin


def test_inverse_cdf_draw_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(5, 1)
    u = torch.tensor([1e-12, 0.4999, 0.5, 0.75, 1 - 1e-12], dtype=torch.float64)
    assert draw_from(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_unseeded_sequences_differ_and_seeded_ones_repeat():
    logits = torch.zeros(32, 500)
    draws = sample(logits, [seq() for _ in range(32)]).token_ids
    assert len(set(draws.tolist())) > 20
    again = [sample(logits[:1], [seq(seed=7)]).token_ids.item() for _ in range(3)]
    assert len(set(again)) == 1


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 3.0]])
    s = seq(prompt=[1, 2], output=[2, 3, 3], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, sampling_batch([s], "cpu"))[0]
    expected = [1.0, -1.0 * 2, 2.0 / 2, -2.0 * 2, 0.5, 3.0]  # repetition over prompt + output: tokens 1, 2, 3
    expected[2] -= 0.25 * 1 + 0.5  # token 2 once in the output
    expected[3] -= 0.25 * 2 + 0.5  # token 3 twice
    assert got.tolist() == pytest.approx(expected)


def test_eos_and_stop_ids_are_banned_before_min_tokens():
    logits = torch.full((1, 10), -5.0)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 2] = 8.0
    early = seq(output=[4], min_tokens=3, stop_token_ids=[7], temperature=0)
    assert sample(logits, [early]).token_ids.item() == 2
    done = seq(output=[4, 4, 4], min_tokens=3, stop_token_ids=[7], temperature=0)
    assert sample(logits, [done]).token_ids.item() == EOS
    ignoring = seq(output=[4], min_tokens=3, ignore_eos=True, temperature=0)
    assert sample(logits, [ignoring]).token_ids.item() == EOS


def test_grammar_bitmask_confines_every_row():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(3, 40, dtype=torch.bool)
    allowed[0, [3, 9]] = True
    allowed[1, 17] = True
    allowed[2] = True
    for params in (dict(temperature=0.0), dict(temperature=2.0)):
        tokens = sample(logits, [seq(seed=i, **params) for i in range(3)],
                        token_bitmask=TokenBitmask.from_bool(allowed)).token_ids.tolist()
        assert tokens[0] in (3, 9) and tokens[1] == 17


def test_top_logprobs_hold_the_best_and_the_sampled_token():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    allowed = torch.tensor([[True, True, True, True], [True, False, False, True]])
    out = sample(logits, [seq(logprobs=2, temperature=0), seq(logprobs=1, temperature=0)],
                 token_bitmask=TokenBitmask.from_bool(allowed))
    expected = logits[0].log_softmax(-1)
    assert out.logprobs[0] == pytest.approx({0: expected[0].item(), 1: expected[1].item()})
    assert out.token_ids[1].item() in (0, 3)  # a tie between the two allowed tokens
    assert set(out.logprobs[1]) <= {0, 3} and out.token_ids[1].item() in out.logprobs[1]
    assert all(v == pytest.approx(math.log(0.5)) for v in out.logprobs[1].values())
    none_asked = sample(logits, [seq(temperature=0), seq(logprobs=0, temperature=0)])
    assert none_asked.logprobs[0] is None and list(none_asked.logprobs[1]) == [2]
