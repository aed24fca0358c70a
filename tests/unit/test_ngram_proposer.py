"""Prompt-lookup proposals: hand-made cases, then agreement with a brute-force reference on random sequences."""
import random

import numpy as np
import pytest

from optimum_nvidia_core.engine.ngram_proposer import NgramProposer


def reference(tokens, k, n_min, n_max):
    """The definition, literally: longest n first, most recent earlier occurrence, the k tokens after it."""
    for n in range(n_max, n_min - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + k]
    return []


def test_copies_what_followed_the_longest_most_recent_match():
    p = NgramProposer(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    # "7 8 9" occurred at 0 (followed by 1 2 3) and "8 9" at 6 (followed by 5 5): the 3-gram wins.
    tokens = [7, 8, 9, 1, 2, 3, 8, 9, 5, 5, 0, 7, 8, 9]
    assert p.propose(tokens).tolist() == [1, 2, 3]
    # Two occurrences of the same 2-gram: the most recent one's continuation.
    assert p.propose([4, 6, 1, 4, 6, 2, 4, 6]).tolist() == [2, 4, 6]


def test_no_match_no_proposal_and_min_ngram_is_respected():
    p = NgramProposer(num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=2)
    assert p.propose([1, 2, 3, 4, 5]).tolist() == []  # the last token never occurred before
    assert p.propose([1, 9, 3, 4, 9]).tolist() == []  # only a 1-gram matches: below prompt_lookup_min
    assert NgramProposer(4, 4, 1).propose([1, 9, 3, 4, 9]).tolist() == [3, 4, 9]
    assert p.propose([]).tolist() == [] and p.propose([3]).tolist() == []


def test_proposal_is_capped_by_k_max_tokens_and_the_end_of_the_text():
    p = NgramProposer(num_speculative_tokens=8, prompt_lookup_max=2, prompt_lookup_min=1)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2]
    assert p.propose(tokens).tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert p.propose(tokens, max_tokens=3).tolist() == [3, 4, 5]
    assert p.propose(tokens, max_tokens=0).tolist() == []
    assert p.propose([5, 6, 5, 6]).tolist() == [5, 6]  # the continuation runs into the suffix itself: still real


def test_window_limits_the_search():
    tokens = [1, 2, 3] + [0] * 50 + [1, 2]
    assert NgramProposer(2, 2, 2, window=100).propose(tokens).tolist() == [3, 0]
    assert NgramProposer(2, 2, 2, window=20).propose(tokens).tolist() == []


@pytest.mark.parametrize("n_min,n_max,k", [(1, 1, 2), (1, 3, 4), (2, 4, 8), (3, 5, 1)])
def test_agrees_with_the_brute_force_reference(n_min, n_max, k):
    rng = random.Random(n_min * 100 + n_max * 10 + k)
    p = NgramProposer(k, n_max, n_min)
    for _ in range(300):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        assert p.propose(tokens).tolist() == reference(tokens, k, n_min, n_max), tokens
        assert p.propose(np.array(tokens, dtype=np.int32)).tolist() == reference(tokens, k, n_min, n_max)


def test_batch_layout_is_padded_with_minus_one():
    p = NgramProposer(3, 2, 1)
    drafts, lengths = p.propose_batch([[1, 2, 1], [1, 2, 3], [4, 5, 6, 4, 5]], max_tokens=[5, 5, 1])
    assert drafts.tolist() == [[2, 1, -1], [-1, -1, -1], [6, -1, -1]]
    assert lengths.tolist() == [2, 0, 1]


@pytest.mark.parametrize("options", [dict(num_speculative_tokens=0), dict(prompt_lookup_min=0),
                                     dict(prompt_lookup_min=3, prompt_lookup_max=2), dict(window=4)])
def test_bad_settings_name_the_problem(options):
    settings = dict(num_speculative_tokens=2, prompt_lookup_max=4, prompt_lookup_min=1) | options
    with pytest.raises(ValueError, match="|".join(options)):
        NgramProposer(**settings)
