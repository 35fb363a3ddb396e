"""The engine factory: a pool's `engine` picks the loader; the hf path loads the reference engine."""

from __future__ import annotations

import pytest

from eft_serve.config import PoolConfig
from eft_serve.engine.factory import load_engine
from eft_serve.engine.hf_engine import HFEngine


def test_hf_kind_loads_the_transformers_engine(tmp_path) -> None:
    from eft_serve.testing.arch_families import build_arch_family

    family = build_arch_family("llama", tmp_path)
    engine = load_engine("hf", family.paths["small_base"], name="small_base", device="cpu", kv_cache_bytes=1 << 20)
    assert isinstance(engine, HFEngine) and engine.info.name == "small_base"


def test_unknown_kind_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        load_engine("tgi", tmp_path, name="x")  # type: ignore[arg-type]


def test_pool_config_defaults_to_hf_and_validates_vllm_options() -> None:
    pool = PoolConfig(model="demo:large_base")
    assert pool.engine == "hf" and pool.vllm.tensor_parallel_size == 1 and pool.vllm.enable_prefix_caching
    with pytest.raises(ValueError):
        PoolConfig.model_validate({"model": "m", "engine": "vllm", "vllm": {"gpu_memory_utilization": 1.5}})
    with pytest.raises(ValueError):
        PoolConfig.model_validate({"model": "m", "engine": "tgi"})
