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
        top_logprobs=args.top_logprobs,
        timeout_s=args.timeout,
        speculative=args.speculative,
        max_draft_tokens=args.max_draft_tokens,
        adaptive_draft=args.adaptive_draft,
        messages=chat_messages(args),
    )


def chat_messages(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`--message ROLE=TEXT` flags in order; with `--chat` or any `--message`, a non-empty
    positional prompt becomes the last user message."""
    messages: list[tuple[str, str]] = []
    for item in args.message or []:
        role, sep, content = item.partition("=")
        if not sep:
            raise SystemExit(f"--message needs ROLE=TEXT (role system, user or assistant), got {item!r}")
        messages.append((role.strip(), content))
    prompt = getattr(args, "prompt", "") or ""
    if (args.chat or messages) and prompt:
        messages.append(("user", prompt))
    return messages


def request_prompt(args: argparse.Namespace) -> str:
    """The plain prompt to send: empty when the request is a chat (see `chat_messages`)."""
    return "" if args.chat or args.message else (getattr(args, "prompt", "") or "")


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


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """`--tls`, `--ca-cert` ($EFT_CA_CERT), `--client-cert`, `--client-key`: see `tls_kwargs`."""
    p.add_argument("--tls", action="store_true", help="dial with TLS, trusting the system CAs (implied by --ca-cert)")
    p.add_argument(
        "--ca-cert",
        default=os.environ.get("EFT_CA_CERT") or None,
        metavar="PEM",
        help="CA certificate that signed the server's (implies --tls; default: $EFT_CA_CERT)",
    )
    p.add_argument("--client-cert", metavar="PEM", help="client certificate, for a server that requires mTLS")
    p.add_argument("--client-key", metavar="PEM", help="private key of --client-cert")


def tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The client's TLS keyword arguments from the flags of `add_tls_flags`."""
    if (args.client_cert is None) != (args.client_key is None):
        raise SystemExit("error: --client-cert and --client-key go together (mTLS)")
    return dict(tls=args.tls, ca_cert=args.ca_cert, client_cert=args.client_cert, client_key=args.client_key)


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """Every request field as a flag named after it (see `request_kwargs`)."""
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a chat user message: each model sees it in its own chat format",
    )
    p.add_argument(
        "--message",
        action="append",
        metavar="ROLE=TEXT",
        help="a chat message before the prompt (repeatable; role system, user or assistant)",
    )
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
    p.add_argument(
        "--top-logprobs",
        type=int,
        default=0,
        metavar="N",
        help="top_logprobs: the N most likely tokens of the merged distribution at each step (0 = none)",
    )
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
    with EftClient(args.address, api_key=args.api_key, **tls_kwargs(args)) as client:
        try:
            for msg in client.generate(request_prompt(args), **request_kwargs(args)):
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
    p.add_argument("prompt", nargs="?", default="", help="the prompt (with --chat: the user message)")
    p.add_argument("--address", default="127.0.0.1:9000", help="host:port of the service (default %(default)s)")
    add_api_key_flag(p)
    add_tls_flags(p)
    add_request_flags(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
