"""CLI flags are named after the request fields they set; a flag whose meaning changes fails loudly."""

from __future__ import annotations

import pytest

from eft_serve.cli import _generate_kwargs, build_parser


def test_flags_set_the_fields_they_are_named_after() -> None:
    args = build_parser().parse_args(["generate", "hi", "--logprob-top-k", "0", "--sample-top-k", "3"])
    kwargs = _generate_kwargs(args)
    assert kwargs["logprob_top_k"] == 0  # the merge's per-model truncation (exact mode)
    assert kwargs["top_k"] == 3  # sampling truncation of the merged distribution


def test_defaults_leave_both_truncations_to_the_server() -> None:
    kwargs = _generate_kwargs(build_parser().parse_args(["generate", "hi"]))
    assert kwargs["logprob_top_k"] is None and kwargs["top_k"] == 0


@pytest.mark.parametrize("argv", [["--top-k", "5"], ["--top-k"]])
def test_retired_top_k_fails_with_the_new_spellings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "hi", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--logprob-top-k" in err and "--sample-top-k" in err
