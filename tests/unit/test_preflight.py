"""Start-up refusals a person can read (issue 18 item 4): one line naming the pool and the cause.

The checks that need no Ray (`eft_serve.preflight`), the marker a failing replica raises and the
driver finds again in Serve's status text (`serve.startup_failure`), and `eft serve` itself: a bad
model directory is one `error: pool '...': ...` line on stderr and exit 2, before anything starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eft_serve.config import demo_config
from eft_serve.preflight import StartupError, check_model_dir, preflight
from eft_serve.serve.startup_failure import cause_in, marked
from eft_serve.testing.arch_families import build_arch_family, demo_tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_arch_family("llama", tmp_path_factory.mktemp("fam"), large_head_rows=None)


def _cfg(**models: str):
    return demo_config().with_models(**models)


def _refusal(**models: str) -> str:
    with pytest.raises(StartupError) as err:
        preflight(_cfg(**models))
    return str(err.value)


def test_a_good_family_passes(family) -> None:
    preflight(_cfg(**{r: str(p) for r, p in family.paths.items()}))


def test_missing_directory(tmp_path) -> None:
    msg = _refusal(small_ft=str(tmp_path / "nope"))
    assert msg.startswith("pool 'small_ft': model directory ") and "does not exist" in msg


def test_a_file_instead_of_a_directory(tmp_path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    assert "is not a directory" in _refusal(large_base=str(f))


def test_no_config_json(tmp_path) -> None:
    assert "has no config.json" in _refusal(small_base=str(tmp_path))


def test_unreadable_config_json(tmp_path, family) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert "is not valid JSON" in _refusal(small_base=str(bad))


def test_no_tokenizer_files(tmp_path, family) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((family.paths["small_base"] / "config.json").read_text())
    msg = _refusal(small_base=str(bare))
    assert msg.startswith("pool 'small_base':") and "no tokenizer files" in msg


def test_remote_code_is_refused_unless_the_pool_grants_it(tmp_path, family) -> None:
    d = tmp_path / "custom"
    d.mkdir()
    config = json.loads((family.paths["small_base"] / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    demo_tokenizer().save_pretrained(d)
    msg = _refusal(small_ft=str(d))
    assert msg.startswith("pool 'small_ft':") and "trust_remote_code" in msg
    pool = _cfg(small_ft=str(d)).pools["small_ft"].model_copy(update={"trust_remote_code": True})
    check_model_dir(pool, d, cpu_only=True)  # granted: no refusal


def test_vllm_cpu_head_size(family) -> None:
    pool = demo_config().pools["large_base"].model_copy(update={"engine": "vllm", "model": "x"})
    check_model_dir(pool, family.paths["large_base"], cpu_only=True)  # head_dim 32 runs
    cfg_path = family.paths["large_base"] / "config.json"
    config = json.loads(cfg_path.read_text())
    odd = cfg_path.parent.parent / "odd_head"
    odd.mkdir(exist_ok=True)
    (odd / "config.json").write_text(json.dumps({**config, "head_dim": 24}))
    demo_tokenizer().save_pretrained(odd)
    with pytest.raises(ValueError, match="no attention kernel for head size 24"):
        check_model_dir(pool, odd, cpu_only=True)
    check_model_dir(pool, odd, cpu_only=False)  # GPU builds run it


def _with_config(family, where: Path, **changes) -> Path:
    """A copy of the family's large_base config.json (no weights: preflight loads none), changed."""
    config = json.loads((family.paths["large_base"] / "config.json").read_text())
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps({**config, **changes}))
    demo_tokenizer().save_pretrained(where)
    return where


def test_an_architecture_vllm_cannot_run_is_refused_before_serve_starts(tmp_path, family) -> None:
    # XGLM: a transformers model (so the remote-code check passes) that vLLM 0.32 has neither in its
    # registry nor can run through its Transformers backend (its attention is not swappable).
    xglm = _with_config(family, tmp_path / "xglm", architectures=["XGLMForCausalLM"])
    unknown = _with_config(family, tmp_path / "unknown", architectures=["NoSuchForCausalLM"])
    cfg = _cfg(small_ft=str(xglm))
    cfg.pools["small_ft"] = cfg.pools["small_ft"].model_copy(update={"engine": "vllm"})
    with pytest.raises(StartupError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert msg.startswith("pool 'small_ft': vLLM ") and "\n" not in msg, msg
    assert "cannot run architecture XGLMForCausalLM" in msg and msg.endswith("serve this model with engine: hf")
    pool = cfg.pools["small_ft"]
    with pytest.raises(ValueError, match="cannot run architecture NoSuchForCausalLM"):
        check_model_dir(pool, unknown, cpu_only=False)  # not a kernel question: GPU builds refuse it too
    # The same checkpoints on the hf engine are not vLLM's business.
    check_model_dir(pool.model_copy(update={"engine": "hf"}), xglm, cpu_only=True)
    # What vLLM's registry lists passes: natively (Llama) or through its Transformers backend
    # (GPT-NeoX, which the registry maps there).
    check_model_dir(pool, family.paths["large_base"], cpu_only=True)
    neox = _with_config(family, tmp_path / "neox", architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    check_model_dir(pool, neox, cpu_only=True)
    # Not in the registry, but a transformers model whose attention vLLM's Transformers backend
    # can swap: vLLM (model_impl: auto) falls back to that backend, so preflight does not refuse it.
    codegen = _with_config(family, tmp_path / "codegen", architectures=["CodeGenForCausalLM"], model_type="codegen")
    check_model_dir(pool, codegen, cpu_only=True)
    # Code shipped with the checkpoint (granted): vLLM's Transformers backend runs it; not run here.
    custom = _with_config(
        family,
        tmp_path / "custom",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    check_model_dir(pool.model_copy(update={"trust_remote_code": True}), custom, cpu_only=True)


def test_tokenizer_mismatch_names_both_pools_and_the_first_ids(tmp_path, family) -> None:
    other = build_arch_family("llama", tmp_path / "other", tokenizer=demo_tokenizer(seed=1))
    msg = _refusal(
        large_base=str(family.paths["large_base"]),
        small_base=str(family.paths["small_base"]),
        small_ft=str(other.paths["small_ft"]),
    )
    assert msg.startswith("pool 'small_ft': its tokenizer") and "pool 'large_base'" in msg
    assert "first differences: id " in msg


def test_a_replica_marker_survives_a_traceback() -> None:
    exc = marked("pool 'small_ft'", FileNotFoundError("no such file:\n  /x/model.safetensors"))
    text = f"Traceback (most recent call last):\n  File ...\nReplicaStartupError: {exc}\n\nmore text"
    assert cause_in(text) == "pool 'small_ft': no such file: /x/model.safetensors"
    assert cause_in("no marker here") is None


def test_eft_serve_prints_one_line_and_exits_2(tmp_path) -> None:
    eft = Path(sys.executable).parent / "eft"
    proc = subprocess.run(
        [str(eft), "serve", "--small-ft", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"EFT_LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: pool 'small_ft': model directory {tmp_path / 'missing'} does not exist"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_an_adapter_over_another_base_is_refused_naming_the_pool(tmp_path, family) -> None:
    from eft_serve.testing.lora_fixtures import make_lora_adapter

    other = build_arch_family("llama", tmp_path / "other", seed=5)
    adapter = make_lora_adapter(other.paths["small_base"], tmp_path / "adapter")
    msg = _refusal(
        large_base=str(family.paths["large_base"]),
        small_base=str(family.paths["small_base"]),
        small_ft=str(adapter),
    )
    assert msg.startswith("pool 'small_ft': LoRA adapter ") and "\n" not in msg, msg
    # Over its own base it passes.
    preflight(
        _cfg(
            large_base=str(family.paths["large_base"]),
            small_base=str(other.paths["small_base"]),
            small_ft=str(adapter),
        )
    )
