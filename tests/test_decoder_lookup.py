"""Context drafts (prompt lookup): the pure matcher, its validation, and exact verification with the engine."""

from __future__ import annotations

import pytest

import stopwise
from stopwise.decoder.lookup import Acceptance, best_block, check_lookup, context_draft


def test_longest_ngram_and_latest_occurrence_win():
    # "1 2" occurs twice before the tail; the latest occurrence (followed by 7 8) wins.
    ctx = [1, 2, 5, 6, 1, 2, 7, 8, 9, 1, 2]
    assert context_draft(ctx, max_ngram=2, length=3) == ([7, 8, 9], 2)
    # The 3-gram "9 1 2" never occurred before, "1 2" did: fall back to shorter n-grams.
    assert context_draft(ctx, max_ngram=3, length=2) == ([7, 8], 2)
    # A 3-gram match beats a later 1-gram match of its last token.
    ctx = [4, 5, 6, 10, 11, 6, 12, 4, 5, 6]
    assert context_draft(ctx, max_ngram=3, length=2) == ([10, 11], 3)
    assert context_draft(ctx, max_ngram=1, length=2) == ([12, 4], 1)


def test_no_match_length_limits_and_short_contexts():
    assert context_draft([1, 2, 3, 4], max_ngram=3, length=5) == ([], 0)
    assert context_draft([7, 7], max_ngram=3, length=5) == ([7], 1)  # a run of one token drafts itself
    assert context_draft([], max_ngram=3, length=5) == ([], 0)
    assert context_draft([3], max_ngram=3, length=5) == ([], 0)
    assert context_draft([1, 2, 1], max_ngram=0, length=5) == ([], 0)
    assert context_draft([1, 2, 1], max_ngram=1, length=0) == ([], 1)
    # The draft stops at the end of the context: what followed the match is all there is.
    assert context_draft([1, 2, 1], max_ngram=1, length=5) == ([2, 1], 1)


@pytest.mark.parametrize(("lookup", "draft"), [(-1, 8), (True, 8), (2.0, 8), (3, 0), (3, None)])
def test_bad_options_name_the_parameter(lookup, draft):
    with pytest.raises(stopwise.StopwiseError, match="'lookup(_draft)?' parameter of speculative decoding must be an int"):
        check_lookup(lookup, draft)
    assert check_lookup(0, 1) == (0, 1)


def test_acceptance_counts_accepts_until_the_first_rejection_and_decays():
    acc = Acceptance(decay=0.5)
    assert acc.rate(2) == 0.5  # the prior
    acc.update([(2, 4, 4), (1, 3, 0)])  # n=2: four accepted, none rejected; n=1: rejected at once
    assert acc.rate(2) == pytest.approx(5 / 6) and acc.rate(1) == pytest.approx(1 / 3)
    acc.update([(2, 2, 1)])  # old counts halve: n=2 has 2 + 1 accepted, 0 + 1 rejected
    assert acc.rate(2) == pytest.approx(4 / 6) and acc.rate(1) == pytest.approx(1 / 2.5)


def test_best_block_trades_expected_tokens_against_block_cost():
    linear = [1.0 + 0.05 * i for i in range(12)]
    # No draft anywhere: nothing to gain.
    assert best_block(1, [(0, 0.5)], linear) == 0
    # A loop (rate 0.95) pays for its whole draft; a poor match (0.02) for none of it.
    assert best_block(1, [(8, 0.95)], linear) == 8
    assert best_block(1, [(8, 0.02)], linear) == 0
    # At a = 0.5: 3 drafts make 1.875 tokens for a block of 1.15 (1.630 per unit), 4 make 1.9375
    # for 1.2 (1.615), 2 make 1.75 for 1.1 (1.591).
    assert best_block(1, [(8, 0.5)], linear) == 3
    # CPU kernels: 3 positions slower than 8, so a 2-token draft is padded up to 7 draft positions.
    bumpy = [1.0, 1.5, 1.9, 1.4, 1.3, 1.3, 1.55, 1.25, 1.35]
    assert best_block(1, [(2, 0.9)], bumpy) == 7
    # Two rows share one block: the row with a loop pays for the block the other row rides in.
    assert best_block(1, [(6, 0.95), (0, 0.5)], linear) == 6
    # The table bounds the block: m pending positions leave len(costs) - m draft positions.
    assert best_block(10, [(8, 0.99)], linear) == 2
