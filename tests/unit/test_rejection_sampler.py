"""Speculative verification: greedy and seeded sampled output identical to plain decoding, token for token (a
small context-dependent "model" decoded both ways); the sampled output keeps the target distribution (fixed seeds,
so the statistics cannot flake); edge cases: all accepted, none, rows with fewer proposals."""
import pytest
import torch

from optimum_nvidia_core.engine.ngram_proposer import NgramProposer
from optimum_nvidia_core.engine.sequence import Sequence
from optimum_nvidia_core.layers.rejection_sampler import (
    RejectionSampler, accept, expand_for_verify, greedy_verify,
)
from optimum_nvidia_core.layers.sampler import Sampler, SamplingBatch
from optimum_nvidia_core.layers.sampling_table import sampling_batch
from optimum_nvidia_core.sampling_params import SamplingParams

VOCAB, EOS = 8, 7


class ToyModel:
    """Logits that depend on the last two tokens: a stand-in for a language model with repetitive output."""

    def __init__(self, seed=0, scale=3.0):
        g = torch.Generator().manual_seed(seed)
        self.a = scale * torch.randn(VOCAB, VOCAB, generator=g)
        self.b = scale * torch.randn(VOCAB, VOCAB, generator=g)

    def __call__(self, context):
        return self.a[context[-1]] + self.b[context[-2]]


def plain_decode(model, seq, steps):
    sampler = Sampler()
    for _ in range(steps):
        batch = sampling_batch([seq], "cpu", [EOS])
        seq.append_token(sampler(model(seq.token_ids)[None, :], batch).token_ids.item())
    return seq.output_token_ids


def speculative_decode(model, seq, steps, k):
    """Propose by prompt lookup, verify all k + 1 positions in one call; returns (output, verify steps)."""
    proposer, verifier, calls = NgramProposer(k, prompt_lookup_max=3, prompt_lookup_min=1), RejectionSampler(), 0
    while seq.num_output_tokens < steps:
        proposal = proposer.propose(seq.token_ids, max_tokens=steps - seq.num_output_tokens - 1).tolist()
        draft = torch.tensor([proposal + [-1] * (k - len(proposal))])
        logits = torch.stack([model(seq.token_ids + proposal[:j]) for j in range(k + 1)])[None]  # [1, k+1, V]
        batch = expand_for_verify(sampling_batch([seq], "cpu", [EOS]), draft)
        out = verifier(logits, draft, batch)
        for token in out.token_ids[0, : out.num_emitted.item()].tolist():
            seq.append_token(token)
        calls += 1
    return seq.output_token_ids, calls


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=0.0, frequency_penalty=0.7, repetition_penalty=1.2),
    dict(temperature=0.8),
    dict(temperature=1.0, top_k=4, top_p=0.9, min_p=0.05),
    dict(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3),
])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_output_is_plain_decoding_token_for_token(params, k):
    for seed in range(6):
        model = ToyModel(seed)
        prompt = [0, 1, 2, 3, 0, 1, 2, 4, 5, 0, 1]
        plain = plain_decode(model, Sequence("p", prompt, SamplingParams(**params), seed=seed), 40)
        spec, calls = speculative_decode(model, Sequence("s", prompt, SamplingParams(**params), seed=seed), 40, k)
        assert spec == plain, (params, seed)
        assert calls <= 40


def test_greedy_speculation_saves_steps_on_repetitive_text():
    model = ToyModel(3, scale=6.0)  # peaked: greedy falls into a loop, which prompt lookup predicts
    plain = plain_decode(model, Sequence("p", [0, 1], SamplingParams(temperature=0)), 60)
    spec, calls = speculative_decode(model, Sequence("s", [0, 1], SamplingParams(temperature=0)), 60, 4)
    assert spec == plain and calls < 30


def test_all_accepted_none_accepted_and_padded_rows():
    logits = torch.randn(4, 4, 11, generator=torch.Generator().manual_seed(1))  # S=4, k=3
    best = logits.argmax(-1)  # [4, 4]
    wrong = (best + 1) % 11
    draft = torch.stack([
        best[0, :3],  # all three accepted: bonus token too
        wrong[1, :3],  # none: the target's first token only
        torch.cat([best[2, :1], torch.tensor([-1, -1])]),  # one proposal, accepted: then the target's next
        torch.tensor([-1, -1, -1]),  # no proposal: a plain decode step
    ])
    draft[0, 2] = best[0, 2]
    out = greedy_verify(logits, draft)
    assert out.num_emitted.tolist() == [4, 1, 2, 1] and out.num_accepted.tolist() == [3, 0, 1, 0]
    assert out.token_ids[0].tolist() == best[0].tolist()
    assert out.token_ids[1].tolist() == [best[1, 0].item(), -1, -1, -1]
    assert out.token_ids[2].tolist() == [best[2, 0].item(), best[2, 1].item(), -1, -1]
    assert out.token_ids[3].tolist() == [best[3, 0].item(), -1, -1, -1]
    mixed = draft.clone()
    mixed[0, 1] = wrong[0, 1]  # a mismatch in the middle: the prefix before it only, then the argmax there
    assert accept(best, mixed).token_ids[0].tolist() == [best[0, 0].item(), best[0, 1].item(), -1, -1]


def test_sampled_verification_keeps_the_target_distribution():
    """Position 0's distribution p0 (after temperature), position 1's p1; the draft proposes x then y. Over 40,000
    fixed seeds: the first emitted token follows p0, x is kept with probability p0(x), and after a kept x the next
    token follows p1 (total variation < 0.015, chi-square below its 0.1% critical value)."""
    rows, temperature = 40_000, 0.9
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.3, 1.5, -1.0, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = (logits / temperature).softmax(-1).double()
    x, y = 3, 1
    seqs = [Sequence("r", [0, 1, 2], SamplingParams(temperature=temperature), seed=s) for s in range(rows)]
    draft = torch.tensor([[x, y]]).repeat(rows, 1)
    batch = expand_for_verify(sampling_batch(seqs, "cpu", [EOS]), draft)
    out = RejectionSampler()(logits.repeat(rows, 1, 1), draft, batch)
    first = out.token_ids[:, 0]
    assert abs((first == x).double().mean().item() - p[0, x].item()) < 0.01
    check_distribution(first, p[0])
    kept_x = out.num_emitted >= 2
    check_distribution(out.token_ids[kept_x, 1], p[1])
    rejected = first[~kept_x]  # drawn from p0 without x, renormalized
    residual = p[0].clone()
    residual[x] = 0
    check_distribution(rejected, residual / residual.sum())


def check_distribution(tokens, probs):
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    freq = counts / counts.sum()
    assert 0.5 * (freq - probs).abs().sum().item() < 0.015, (freq, probs)
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * counts.sum()
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[int(support.sum()) - 1]  # p = 0.001
    assert chi2 < critical, (chi2, freq, probs)


def test_seeded_rows_draw_what_plain_decoding_draws_at_each_position():
    """Row (i, j) of the expanded batch draws with seed i's uniform at position n_i + j, whatever the batch."""
    logits = torch.randn(3, 5, 9, generator=torch.Generator().manual_seed(2))
    seqs = [Sequence("r", list(range(3 + i)), SamplingParams(temperature=1.0), seed=100 + i) for i in range(3)]
    draft = torch.full((3, 4), -1)
    batch = expand_for_verify(sampling_batch(seqs, "cpu", [EOS]), draft)
    target = Sampler()(logits.reshape(15, 9), batch).token_ids.view(3, 5)
    for i, seq in enumerate(seqs):
        for j in range(5):
            if j:
                seq.append_token(0)  # only the count matters for the draw
            alone = Sampler()(logits[i, j][None], sampling_batch([seq], "cpu", [EOS])).token_ids.item()
            assert target[i, j].item() == alone


def test_a_grammar_mask_cannot_be_expanded_silently():
    from optimum_nvidia_core.layers.token_bitmask import TokenBitmask

    seqs = [Sequence("r", [1, 2], SamplingParams(temperature=0.0))]
    batch = sampling_batch(seqs, "cpu", [EOS])
    batch.token_bitmask = object.__new__(TokenBitmask)
    with pytest.raises(ValueError, match="grammar mask"):
        expand_for_verify(batch, torch.tensor([[1, 2]]))
