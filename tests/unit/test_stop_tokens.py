"""Pools agree on the id-to-token map only; each model brings its own stop ids (issue 18).

A chat fine-tune and its base share every id but name different EOS tokens (Qwen2.5-Instruct's
``<|im_end|>`` vs the base's ``<|endoftext|>``; Llama-3-Instruct's ``<|eot_id|>``): they must merge,
and a stream must stop at any of the recipe's models' EOS ids.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eft_serve.coordinator.vocabulary import check_shared_vocabulary
from eft_serve.engine.fingerprint import vocab_fingerprint
from eft_serve.engine.stop_tokens import model_stop_token_ids, token_ids_of
from eft_serve.engine.types import ModelInfo
from eft_serve.errors import FailedPrecondition
from eft_serve.wire.pool_messages import info_from_proto, info_to_proto

WORDS = 40
ENDOFTEXT, IM_START, IM_END = WORDS, WORDS + 1, WORDS + 2


def qwen_like(eos: str, *, rename: dict[int, str] | None = None) -> PreTrainedTokenizerFast:
    """Word tokens then three specials, as Qwen2.5's: both tokenizers of a pair list all three."""
    vocab = {f"w{i}": i for i in range(WORDS)} | {
        "<|endoftext|>": ENDOFTEXT,
        "<|im_start|>": IM_START,
        "<|im_end|>": IM_END,
    }
    for i, token in (rename or {}).items():
        vocab = {(token if v == i else t): v for t, v in vocab.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        unk_token="w0",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def info_of(tokenizer: PreTrainedTokenizerFast, name: str, stops: tuple[int, ...] = ()) -> ModelInfo:
    return ModelInfo(
        name=name,
        vocab_size=len(tokenizer),
        max_context=64,
        eos_token_id=int(tokenizer.eos_token_id),
        vocab_fingerprint=vocab_fingerprint(tokenizer),
        model_fingerprint=name,
        stop_token_ids=stops,
    )


def test_an_instruct_tokenizer_with_its_own_eos_shares_the_base_vocabulary_fingerprint() -> None:
    base, instruct = qwen_like("<|endoftext|>"), qwen_like("<|im_end|>")
    assert (base.eos_token_id, instruct.eos_token_id) == (ENDOFTEXT, IM_END)
    assert base.get_vocab() == instruct.get_vocab()
    assert vocab_fingerprint(base) == vocab_fingerprint(instruct)
    # And the coordinator's start-up check lets them merge.
    check_shared_vocabulary({"large_base": info_of(base, "base"), "small_ft": info_of(instruct, "instruct")})


def test_one_differing_token_changes_the_fingerprint_and_the_refusal_names_it() -> None:
    base = qwen_like("<|endoftext|>")
    other = qwen_like("<|endoftext|>", rename={7: "seven"})
    assert len(other) == len(base) and vocab_fingerprint(other) != vocab_fingerprint(base)
    with pytest.raises(FailedPrecondition) as err:
        check_shared_vocabulary(
            {"large_base": info_of(base, "base"), "small_ft": info_of(other, "other")},
            {"large_base": base, "small_ft": other},
        )
    msg = str(err.value)
    assert f"tokenizer of {len(base)} ids" in msg and "first differing ids: id 7: 'w7' vs 'seven'" in msg


def test_stop_ids_are_the_tokenizer_eos_then_the_generation_config_ones(tmp_path) -> None:
    instruct = qwen_like("<|im_end|>")
    # Qwen2.5-Instruct's generation_config.json lists both ends; the tokenizer's EOS comes first.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert model_stop_token_ids(instruct, tmp_path) == (IM_END, ENDOFTEXT)
    # An int in the generation config; without one, config.json's (its text_config's for VLMs).
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert model_stop_token_ids(instruct, tmp_path) == (IM_END, 5)
    (tmp_path / "generation_config.json").unlink()
    assert model_stop_token_ids(instruct, tmp_path) == (IM_END, 3)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [9, IM_END]}}))
    assert model_stop_token_ids(instruct, tmp_path) == (IM_END, 9)
    assert model_stop_token_ids(instruct, None) == (IM_END,)
    assert token_ids_of(None) == [] and token_ids_of([1, -1, True, 2]) == [1, 2]


def test_the_pool_wire_carries_stop_ids_and_an_old_pool_falls_back_to_its_eos() -> None:
    info = info_of(qwen_like("<|im_end|>"), "instruct", stops=(IM_END, ENDOFTEXT))
    back = info_from_proto(info_to_proto(info, "small_ft"))
    assert back.stop_token_ids == (IM_END, ENDOFTEXT) and back.stop_ids() == {IM_END, ENDOFTEXT}
    old = info_from_proto(info_to_proto(replace(info, stop_token_ids=()), "small_ft"))
    assert old.stop_ids() == {IM_END}
    assert replace(info, stop_token_ids=(), eos_token_id=-1).stop_ids() == frozenset()
