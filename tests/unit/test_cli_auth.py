"""The auth side of the CLIs: `eft serve` refuses to serve without keys unless --insecure,
`eft keys add` stores only a hash, and both CLIs take --api-key / $EFT_API_KEY."""

from __future__ import annotations

import pytest
import yaml

from eft_serve.auth.keys import hash_key, load_key_store
from eft_serve.cli import build_parser, main
from eft_serve.config import demo_config


def test_serve_without_keys_refuses_beyond_loopback_unless_insecure(tmp_path, capsys) -> None:
    data = demo_config().model_dump(mode="json")
    data["ray"]["address"] = "ray://10.0.0.5:10001"  # joining a cluster: its proxy listens on [::]
    data["http"]["host"] = "0.0.0.0"
    config = tmp_path / "eft.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["serve", "--config", str(config), "--grpc-port", "9123"]) == 2  # exits before starting anything
    err = capsys.readouterr().err
    assert "[::]:9123" in err and "http.host is 0.0.0.0" in err and "--insecure" in err and "keys_file" in err
    assert build_parser().parse_args(["serve", "--insecure"]).insecure


def test_loopback_only_stack_needs_no_keys() -> None:
    from eft_serve.cli import exposure_beyond_loopback

    cfg = demo_config()
    assert exposure_beyond_loopback(cfg) == []
    tls = cfg.model_copy(update={"tls": cfg.tls.model_copy(update={"enabled": True, "host": "192.168.1.4"})})
    assert exposure_beyond_loopback(tls) == ["tls.host is 192.168.1.4 (the TLS front)"]


def test_serve_with_auth_but_no_keys_file_fails_before_starting(tmp_path, capsys) -> None:
    data = demo_config().model_dump(mode="json")
    data["auth"] = {"enabled": True, "keys_file": str(tmp_path / "missing.yaml")}
    config = tmp_path / "eft.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["serve", "--config", str(config)]) == 2
    assert "eft keys add" in capsys.readouterr().err


def test_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path, capsys) -> None:
    path = tmp_path / "keys.yaml"
    argv = ["keys", "add", "--id", "team-a", "--file", str(path), "--recipes", "upscale,large_base"]
    assert main([*argv, "--exact", "--streams", "2", "--tpm", "6000"]) == 0
    key = capsys.readouterr().out.strip()
    assert key and key not in path.read_text() and hash_key(key) in path.read_text()
    entry = load_key_store(path, None).lookup(key)
    assert entry is not None and entry.id == "team-a" and entry.allowed_recipes == ["upscale", "large_base"]
    assert entry.exact_mode and entry.max_concurrent_streams == 2 and entry.tokens_per_minute == 6000
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err


def test_api_key_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from eft_serve_client.cli import build_parser as client_parser

    monkeypatch.delenv("EFT_API_KEY", raising=False)
    assert build_parser().parse_args(["generate", "hi"]).api_key is None
    assert build_parser().parse_args(["recipes", "--api-key", "k1"]).api_key == "k1"
    assert client_parser().parse_args(["generate", "hi", "--api-key", "k2"]).api_key == "k2"
    monkeypatch.setenv("EFT_API_KEY", "from-env")
    assert build_parser().parse_args(["generate", "hi"]).api_key == "from-env"
    assert build_parser().parse_args(["recipes"]).api_key == "from-env"
    assert client_parser().parse_args(["generate", "hi"]).api_key == "from-env"
