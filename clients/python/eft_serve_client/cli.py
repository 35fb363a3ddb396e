"""The `eft-client` command of the slim client: `eft-client generate PROMPT` streams text to stdout.

Owns argument parsing and printing only; requests go through `eft_serve_client.client`. The
request flags (`add_request_flags` / `request_kwargs`) are the one definition `eft generate` of
the service package uses too, so both commands spell every flag the same way; the final usage line
goes to stderr, so stdout is exactly the generated text. Exit 2 on an RPC error, with its status.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from eft_serve_client.client import EftClient


def _weights(items: Sequence[str] | None) -> dict[str, float]:
    return {name: float(value) for name, _, value in (item.partition("=") for item in items or [])}


def request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The client's request keyword arguments from the flags of `add_request_flags`."""
    return dict(
        recipe=args.recipe,
        beta=args.beta,
        expert_weights=_weights(args.expert_weight),
        conservative=args.conservative,
        logprob_top_k=args.logprob_top_k,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.sample_top_k,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        speculative=args.speculative,
        max_draft_tokens=args.max_draft_tokens,
        adaptive_draft=args.adaptive_draft,
    )


class _RetiredTopK(argparse.Action):
    """`--top-k` used to set the merge's per-model logprob truncation, while the request field
    `top_k` is the sampling truncation. Rather than silently change what it does, it fails with
    the new spelling for one release; afterwards it will mean `sampling.top_k`."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "--top-k is retired for this release because its meaning is changing: use --logprob-top-k K "
            "for the per-model logprob truncation it used to set (merge.logprob_top_k; 0 = exact), or "
            "--sample-top-k K for top-k sampling of the merged distribution (sampling.top_k)"
        )


def add_api_key_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=os.environ.get("EFT_API_KEY"),
        help="API key, sent as 'authorization: Bearer <key>' (default: $EFT_API_KEY)",
    )


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """Every request field as a flag named after it (see `request_kwargs`)."""
    p.add_argument("--recipe", help="recipe name; default: the server's")
    p.add_argument("--beta", type=float, help="strength of the behaviour delta (default 1)")
    p.add_argument("--expert-weight", action="append", metavar="ROLE=W", help="per-expert weight (repeatable)")
    p.add_argument("--conservative", action="store_true", help="conservative decoding")
    p.add_argument(
        "--logprob-top-k",
        type=int,
        metavar="K",
        help="merge.logprob_top_k: per-model top-k logprobs merged; 0 = exact full vocabulary",
    )
    p.add_argument("--top-k", action=_RetiredTopK, nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1)")
    p.add_argument("--top-p", type=float)
    p.add_argument(
        "--sample-top-k",
        type=int,
        default=0,
        metavar="K",
        help="sampling.top_k: top-k truncation of the merged distribution (0 = off)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--timeout", type=float, default=0.0, help="request deadline in seconds")
    p.add_argument(
        "--speculative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speculative.enabled: draft-and-verify decoding (same output); default: the server's",
    )
    p.add_argument("--max-draft-tokens", type=int, metavar="K", help="speculative.max_draft_tokens per block")
    p.add_argument(
        "--adaptive-draft",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speculative.adaptive: adapt the block length; default: the server's",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    final = None
    with EftClient(args.address, api_key=args.api_key) as client:
        try:
            for msg in client.generate(args.prompt, **request_kwargs(args)):
                print(msg.text, end="", flush=True)
                if msg.HasField("usage"):
                    final = msg
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    print(flush=True)
    if final is not None:
        u = final.usage
        print(
            f"[{u.completion_tokens} tokens, {u.tokens_per_s:.1f} tok/s, recipe {u.recipe}, seed {u.seed}]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft-client", description="Slim client of EFT Serve (eft.v1.EftService).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="stream a generation from a running EFT Serve")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:9000", help="host:port of the service (default %(default)s)")
    add_api_key_flag(p)
    add_request_flags(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
