"""FakeEngine: determinism, the same record invariants as the real engine, fingerprints, drafts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eft_serve.engine.types import DraftQuery, LogprobEngine, SequenceQuery
from eft_serve.testing.fake_engine import FakeEngine

V = 50


def test_deterministic_and_depends_on_last_two_tokens():
    a, b = FakeEngine(V, seed=1), FakeEngine(V, seed=1)
    np.testing.assert_array_equal(a.logprobs([3, 4, 5]), b.logprobs([3, 4, 5]))
    # Only the last two tokens matter.
    np.testing.assert_array_equal(a.logprobs([9, 4, 5]), a.logprobs([3, 4, 5]))
    assert not np.allclose(a.logprobs([3, 5]), a.logprobs([4, 5]))
    assert not np.allclose(a.logprobs([4, 5]), FakeEngine(V, seed=2).logprobs([4, 5]))
    # Call order does not matter (rows are drawn from (seed, token), not a running stream).
    c = FakeEngine(V, seed=1)
    c.logprobs([7])
    np.testing.assert_array_equal(c.logprobs([3, 4, 5]), a.logprobs([3, 4, 5]))
    lp = a.logprobs([1])
    assert lp.dtype == np.float32 and abs(np.logaddexp.reduce(lp.astype(np.float64))) < 1e-5


def test_record_invariants():
    eng: LogprobEngine = FakeEngine(V, seed=0)
    toks, cands = [1, 2, 3, 4, 5], [0, 7, 7, 49]
    topk = eng.next_token_logprobs([SequenceQuery(toks, 3, cands)], logprob_top_k=6)[0]
    full = eng.next_token_logprobs([SequenceQuery(toks, 3, cands)], logprob_top_k=0)[0]
    assert topk.cached_tokens == 0 and len(topk.positions) == 3
    for j, (p, f) in enumerate(zip(topk.positions, full.positions)):
        expect = eng.logprobs(toks[: 5 - 3 + 1 + j])
        np.testing.assert_array_equal(f.full_logprobs, expect)
        assert f.top_ids.size == 0 and f.tail_logmass == -math.inf
        assert p.top_ids.shape == (6,) and p.full_logprobs is None
        assert np.all(np.diff(p.top_logprobs) <= 0)
        np.testing.assert_array_equal(p.top_ids, np.argsort(-expect, kind="stable")[:6])
        np.testing.assert_allclose(p.top_logprobs, expect[p.top_ids], atol=1e-6)
        total = np.logaddexp(np.logaddexp.reduce(p.top_logprobs.astype(np.float64)), p.tail_logmass)
        assert abs(total) < 1e-4
        np.testing.assert_allclose(p.candidate_logprobs, expect[cands], atol=1e-6)
        np.testing.assert_allclose(f.candidate_logprobs, expect[cands], atol=1e-6)


def test_peaked_distribution_keeps_tail_finite_and_exact():
    # A tail of ~1e-20 is far below float32's 1 - sum(top) resolution; it must still be right.
    table = np.zeros((V, V))
    table[:, 0] = 50.0
    eng = FakeEngine(V, table=table)
    p = eng.next_token_logprobs([SequenceQuery([3])], logprob_top_k=1)[0].positions[0]
    assert p.top_ids.tolist() == [0]
    expected_tail = math.log(V - 1) - 50.0  # log((V-1) e^0 / (e^50 + ...)) ~= log(V-1) - 50
    assert p.tail_logmass == pytest.approx(expected_tail, abs=1e-3)


def test_logits_fn_and_fingerprints():
    eng = FakeEngine(8, logits_fn=lambda prefix: np.arange(8.0) * (len(prefix) % 2), name="fn")
    assert eng.next_token_logprobs([SequenceQuery([1])], logprob_top_k=1)[0].positions[0].top_ids.tolist() == [7]
    same_vocab = FakeEngine(V, seed=3).info.vocab_fingerprint == FakeEngine(V, seed=4).info.vocab_fingerprint
    assert same_vocab
    assert FakeEngine(V).info.vocab_fingerprint != FakeEngine(V + 1).info.vocab_fingerprint
    assert FakeEngine(V, seed=3).info.model_fingerprint != FakeEngine(V, seed=4).info.model_fingerprint
    odd = FakeEngine(V, vocab_fingerprint="other-vocab", model_fingerprint="m1")
    assert (odd.info.vocab_fingerprint, odd.info.model_fingerprint) == ("other-vocab", "m1")
    assert FakeEngine(V).info.eos_token_id == V - 1


def test_draft_is_greedy_chain():
    eng = FakeEngine(V, seed=5)
    drafts = eng.draft([DraftQuery([1, 2], 4), DraftQuery([9], 0), DraftQuery([3], 2)])
    assert [len(d) for d in drafts] == [4, 0, 2]
    seq = [1, 2]
    for t in drafts[0]:
        assert t == int(np.argmax(eng.logprobs(seq)))
        seq.append(t)
    assert eng.num_draft_calls == 1


def test_validation_matches_real_engine_rules():
    eng = FakeEngine(V, max_context=8)
    for q in (
        SequenceQuery([]),
        SequenceQuery([V]),
        SequenceQuery(list(range(9))),
        SequenceQuery([1], num_positions=2),
        SequenceQuery([1], candidate_ids=[-1]),
    ):
        with pytest.raises(ValueError):
            eng.next_token_logprobs([q], logprob_top_k=2)
    with pytest.raises(ValueError):
        eng.next_token_logprobs([SequenceQuery([1])], logprob_top_k=-3)
    with pytest.raises(ValueError):
        eng.draft([DraftQuery(list(range(8)), 2)])
    with pytest.raises(ValueError):
        FakeEngine(V, table=np.zeros((3, 3)))
    assert eng.num_calls == 0  # rejected calls are not counted
    eng.next_token_logprobs([SequenceQuery([1]), SequenceQuery([2])], logprob_top_k=3)
    assert (eng.num_calls, eng.num_queries, eng.last_logprob_top_k) == (1, 2, 3)
