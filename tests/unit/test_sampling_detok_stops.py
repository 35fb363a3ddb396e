"""Sampling determinism and validity, incremental detokenisation, stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from eft_serve.core.detokenizer import IncrementalDetokenizer
from eft_serve.core.merge import MergedDistribution
from eft_serve.core.sampling import SamplingParams, choose_token, sampling_distribution
from eft_serve.core.stops import StopStringMatcher
from eft_serve.errors import InvalidArgument


def dist(probs: list[float], support: list[int] | None = None) -> MergedDistribution:
    p = np.asarray(probs, dtype=np.float64)
    return MergedDistribution(np.asarray(support or list(range(len(p))), np.int64), np.log(p / p.sum()), {})


def test_greedy_picks_argmax_and_lowest_id_on_ties() -> None:
    assert choose_token(dist([0.1, 0.7, 0.2]), SamplingParams(temperature=0), 5) == 1
    assert choose_token(dist([0.4, 0.4, 0.2], [3, 9, 11]), SamplingParams(temperature=0), 5) == 3


def test_same_seed_same_token_and_frequencies_match() -> None:
    d = dist([0.2, 0.5, 0.3])
    params = SamplingParams(temperature=1.0, seed=42)
    assert [choose_token(d, params, t) for t in range(50)] == [choose_token(d, params, t) for t in range(50)]
    counts = np.bincount([choose_token(d, SamplingParams(seed=s), 0) for s in range(3000)], minlength=3)
    np.testing.assert_allclose(counts / 3000, [0.2, 0.5, 0.3], atol=0.04)


def test_top_k_top_p_temperature() -> None:
    d = dist([0.05, 0.6, 0.3, 0.05])
    p = sampling_distribution(d, SamplingParams(top_k=2))
    assert p[0] == 0 and p[3] == 0 and p.sum() == pytest.approx(1)
    p = sampling_distribution(d, SamplingParams(top_p=0.5))
    assert p.tolist() == [0, 1, 0, 0]
    cold = sampling_distribution(d, SamplingParams(temperature=0.1))
    assert cold[1] > 0.99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=10_000), "cap"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_sampling_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        SamplingParams(**kwargs).validate(max_new_tokens_cap=512)


class ByteTokenizer:
    """Each token is one UTF-8 byte: the harshest case for streaming multi-byte characters."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_emits_broken_characters() -> None:
    text = "Zürich → 東京 ok 🙂!"
    ids = list(text.encode())
    prompt = list(b"Q: ")
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # held back mid-character


def test_stop_strings_hold_back_and_cut() -> None:
    m = StopStringMatcher(["</s>", "END"])
    out = [m.feed(x) for x in ["Hello ", "wor", "ld <", "/", "s> more"]]
    assert "".join(out) == "Hello world "
    assert m.stopped
    m2 = StopStringMatcher(["END"])
    assert m2.feed("a E") == "a "
    assert m2.feed("x") == "Ex"
    assert m2.feed("EN") == ""
    assert m2.flush() == "EN"
    assert not m2.stopped
