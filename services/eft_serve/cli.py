"""The `eft` command: serve the stack, stream a generation, run the demo, render deploy configs.

Owns argument parsing and printing only; everything it runs lives in `stack`, `client`,
`serve.app` and `demo`. One config tree: YAML (or the built-in demo stack) plus flags.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from eft_serve.config import EftConfig, load_config
from eft_serve.config_overlay import ConfigError
from eft_serve.planning import add_parser as add_plan_parser
from eft_serve.preflight import StartupError
from eft_serve_client.cli import (
    add_api_key_flag,
    add_request_flags,
    add_tls_flags,
    request_kwargs,
    request_prompt,
    tls_kwargs,
)


def _config_from_args(args: argparse.Namespace) -> EftConfig:
    cfg = load_config(args.config)
    cfg = cfg.with_models(large_base=args.large_base, small_base=args.small_base, small_ft=args.small_ft)
    if args.grpc_port is not None:
        cfg = cfg.model_copy(update={"grpc": cfg.grpc.model_copy(update={"port": args.grpc_port})})
    if getattr(args, "http_port", None) is not None:
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": args.http_port})})
    if getattr(args, "no_cache", False):
        cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"enabled": False})})
    return EftConfig.model_validate(cfg.model_dump())


def _add_stack_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML overlay over the built-in demo stack: only the keys you change")
    p.add_argument("--large-base", help="model directory of the large base model")
    p.add_argument("--small-base", help="model directory of the small base model")
    p.add_argument("--small-ft", help="model directory of the small fine-tuned model")
    p.add_argument("--grpc-port", type=int, help="gRPC port of the service (default from config: 9000)")
    p.add_argument(
        "--http-port", type=int, help="Serve's HTTP proxy port: the OpenAI-compatible API (default from config: 8000)"
    )
    p.add_argument("--no-cache", action="store_true", help="disable the result cache (and the local Redis)")
    _add_verbose_flag(p)


def _add_verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show library warnings and Ray/Serve logs (always in the log file)",
    )


# Commands that run libraries at length: quiet by default, their output to a log file (`console`).
QUIET_COMMANDS = ("serve", "demo", "eval", "build-demo")


INSECURE_WARNING = (
    "warning: auth is disabled (auth.enabled: false) and this stack would be reachable beyond loopback: "
    "{reasons}; so anyone who can reach this machine could use the service.\n"
    "Either enable API keys (auth: {{enabled: true, keys_file: keys.yaml}} in --config; `eft keys add` "
    "makes keys) or, on a trusted machine or network, pass --insecure to serve without keys."
)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def exposure_beyond_loopback(cfg: EftConfig) -> list[str]:
    """Why the stack `cfg` describes would be reachable from other machines (empty: loopback only).

    A local `eft serve` binds Serve's gRPC proxy to loopback (`serve/loopback_grpc.py`); a cluster
    it joins does not (the proxy listens on [::] there), and the HTTP and TLS hosts are config."""
    reasons = []
    if cfg.ray.address is not None:
        reasons.append(
            f"it joins the Ray cluster {cfg.ray.address!r}, whose Serve gRPC proxy listens on [::]:{cfg.grpc.port}"
        )
    if not _is_loopback(cfg.http.host):
        reasons.append(f"http.host is {cfg.http.host} (the OpenAI-compatible HTTP routes)")
    if cfg.tls.enabled and not _is_loopback(cfg.tls.host):
        reasons.append(f"tls.host is {cfg.tls.host} (the TLS front)")
    return reasons


def cmd_serve(args: argparse.Namespace) -> int:
    from eft_serve.stack import local_stack

    cfg = _config_from_args(args)
    if cfg.auth.keys_file:  # the coordinator replica may run in another directory
        auth = cfg.auth.model_copy(update={"keys_file": str(Path(cfg.auth.keys_file).resolve())})
        cfg = cfg.model_copy(update={"auth": auth})
    if cfg.auth.enabled:
        from eft_serve.auth.keys import load_key_store

        try:  # fail here, before anything starts, rather than in the coordinator replica
            store = load_key_store(cfg.auth.keys_file, cfg.auth.keys_env)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"[eft] API keys required ({len(store.keys)} keys)", flush=True)
    elif (reasons := exposure_beyond_loopback(cfg)) and not args.insecure:
        print(INSECURE_WARNING.format(reasons="; ".join(reasons)), file=sys.stderr)
        return 2
    elif not reasons:
        print("[eft] auth off: listening on loopback only; enable API keys before exposing it", flush=True)
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(*_: Any) -> None:
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: unwind now; local_stack stops what it started
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    with local_stack(cfg, http_port=args.http_port, log=lambda m: print(f"[eft] {m}", flush=True)) as effective:
        serving.set()
        from eft_serve.serve.metrics import metrics_endpoints

        print(f"[eft] Prometheus metrics: {', '.join(metrics_endpoints()) or 'not exported'}", flush=True)
        print(f"[eft] serving on 127.0.0.1:{cfg.grpc.port}; Ctrl-C stops everything", flush=True)
        if effective.tls.enabled:
            t = effective.tls
            hint = " --client-cert C --client-key K" if t.client_ca_file else ""
            print(
                f"[eft] TLS on {t.host}:{t.port} (eft generate --address {t.host}:{t.port} --ca-cert CA{hint})",
                flush=True,
            )
        if cfg.http.openai:
            print(f"[eft] OpenAI-compatible API: http://{cfg.http.host}:{cfg.http.port}/v1", flush=True)
        stop.wait()
        print("[eft] stopping", flush=True)
    return 0


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **request_kwargs(args),
        "return_logprobs": args.json,
        "return_model_logprobs": args.json and args.model_logprobs,
    }


def _token_json(t: Any) -> dict[str, Any]:
    """One `TokenInfo` of `eft generate --json`: id, logprob, and `models` / `top` when asked for."""
    out: dict[str, Any] = {"id": t.token_id, "logprob": t.logprob}
    if t.model_logprobs:
        out["models"] = dict(t.model_logprobs)
    if t.top_logprobs:  # --top-logprobs N: the merged distribution's N most likely tokens
        out["top"] = [{"id": a.token_id, "text": a.text, "logprob": a.logprob} for a in t.top_logprobs]
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from eft_serve.client import EftClient

    with EftClient(args.address, api_key=args.api_key, **tls_kwargs(args)) as client:
        text: list[str] = []
        ids: list[int] = []
        try:
            for msg in client.generate(request_prompt(args), **_generate_kwargs(args)):
                text.append(msg.text)
                ids.extend(t.token_id for t in msg.tokens)
                if args.json:
                    print(
                        json.dumps(
                            {
                                "text": msg.text,
                                "tokens": [_token_json(t) for t in msg.tokens],
                            }
                        ),
                        flush=True,
                    )
                else:
                    print(msg.text, end="", flush=True)
                if msg.HasField("usage"):
                    final = msg
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        u = final.usage
        if args.json:
            print(
                json.dumps(
                    {
                        "done": True,
                        "text": "".join(text),
                        "token_ids": ids,
                        "finish_reason": final.finish_reason,
                        "usage": {
                            "prompt_tokens": u.prompt_tokens,
                            "completion_tokens": u.completion_tokens,
                            "tokens_per_s": u.tokens_per_s,
                            "time_to_first_token_ms": u.time_to_first_token_ms,
                            "seed": u.seed,
                            "recipe": u.recipe,
                            "logprob_top_k": u.logprob_top_k,
                            "cache_hits": u.cache_hits,
                            "cache_misses": u.cache_misses,
                        },
                    }
                ),
                flush=True,
            )
        else:
            print(
                f"\n[{u.completion_tokens} tokens, {u.tokens_per_s:.1f} tok/s, recipe {u.recipe}, seed {u.seed}]",
                file=sys.stderr,
            )
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from eft_serve.client import EftClient

    with EftClient(args.address, timeout=10, api_key=args.api_key, **tls_kwargs(args)) as client:
        try:
            reply = client.list_recipes()
            models = client.list_models().models
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
        for r in reply.recipes:
            mark = "*" if r.name == reply.default_recipe else " "
            print(f"{mark} {r.name:12s} {r.formula}\n    {r.description}")
        for m in models:
            print(
                f"  pool {m.role:11s} {m.name} ({m.num_parameters:,} params, vocab {m.vocab_size}, ctx {m.max_context})"
            )
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    from eft_serve.auth.keys import add_key

    try:
        key = add_key(
            args.file,
            args.id,
            allowed_recipes=[r for r in (args.recipes or "").split(",") if r],
            exact_mode=args.exact,
            max_concurrent_streams=args.streams,
            tokens_per_minute=args.tpm,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added key {args.id!r} to {args.file} (only its sha256 is stored); the key, shown once:", file=sys.stderr)
    print(key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eft_serve.showcase import run_demo

    return run_demo(_config_from_args(args), http_port=args.http_port, n_prompts=args.prompts)


def cmd_render(args: argparse.Namespace) -> int:
    from eft_serve.serve.app import render_serve_yaml

    text = render_serve_yaml(load_config(args.config))
    if args.check:
        # The --check convention of every generated artifact: compare in memory, name the file
        # and the command that regenerates it, exit 1 on drift.
        if not args.out:
            print("error: --check needs --out (the committed file to compare with)", file=sys.stderr)
            return 2
        out = Path(args.out)
        if out.is_file() and out.read_text() == text:
            print(f"{out}: up to date")
            return 0
        regenerate = " ".join(
            ["eft render-serve-config", *([f"--config {args.config}"] if args.config else []), f"--out {args.out}"]
        )
        print(f"{out}: {'differs from a fresh render' if out.is_file() else 'missing'}", file=sys.stderr)
        print(f"regenerate with: {regenerate}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    # The effective tree, complete: a valid --config file of its own (it loads as itself).
    print(yaml.safe_dump(load_config(args.config).model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_build_demo(args: argparse.Namespace) -> int:
    from eft_serve.demo.family import ensure_demo_family

    family = ensure_demo_family(seed=args.seed, log=print)
    for role, path in family.paths.items():
        print(f"{role:11s} {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from eft_serve.evaluation.command import EvalOptions, run_eval

    return run_eval(
        EvalOptions(
            address=args.address,
            prompts=args.prompts,
            out=Path(args.out),
            seed=args.seed,
            sweeps=args.sweeps,
            topk_table=args.topk_table,
            threads=args.threads,
        ),
        log=lambda m: print(m, flush=True),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft", description="Emulated fine-tuning / LM up-scaling as a service")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the whole stack in the foreground on a local Ray cluster")
    _add_stack_flags(p)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without API keys although the stack is reachable beyond loopback (trusted networks only)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream a completion from a running server")
    p.add_argument("prompt", nargs="?", default="", help="the prompt (with --chat: the user message)")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--json", action="store_true", help="JSON lines; the last carries token_ids and text")
    p.add_argument("--model-logprobs", action="store_true", help="with --json: each model's logprob per token")
    add_api_key_flag(p)
    add_tls_flags(p)
    add_request_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("recipes", help="list a running server's recipes and models")
    p.add_argument("--address", default="127.0.0.1:9000")
    add_api_key_flag(p)
    add_tls_flags(p)
    p.set_defaults(func=cmd_recipes)

    keys = sub.add_parser("keys", help="manage the API keys file (auth.keys_file)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("add", help="make a random key, print it once, store only its sha256")
    p.add_argument("--id", required=True, help="the key's name (in logs and messages)")
    p.add_argument("--file", required=True, help="the keys file (YAML; created if missing)")
    p.add_argument("--recipes", help="comma-separated recipes the key may use (default: all)")
    p.add_argument("--exact", action="store_true", help="may request exact mode (logprob_top_k = 0)")
    p.add_argument("--streams", type=int, default=4, help="concurrent calls (default %(default)s)")
    p.add_argument("--tpm", type=int, help="generated tokens per minute (default: unlimited)")
    p.set_defaults(func=cmd_keys_add)

    p = sub.add_parser("demo", help="build the demo family, start the stack, compare models side by side, stop")
    _add_stack_flags(p)
    p.add_argument("--prompts", type=int, default=4, help="how many held-out prompts")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("render-serve-config", help="print the Serve config (serve run / KubeRay) for a config")
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if --out differs from a fresh render (names the file and the fix)",
    )
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("eval", help="held-out knowledge/behaviour evaluation through the service; writes docs/results")
    p.add_argument("--address", help="a running server (default: start the full-family stack, stop it after)")
    p.add_argument("--prompts", type=int, help="how many held-out questions (default: all 180)")
    p.add_argument("--out", default="docs/results", help="where CSV, PNG, summary.json and README.md go")
    p.add_argument("--seed", type=int, default=0, help="picks the --prompts subset; sent as the request seed")
    p.add_argument("--sweeps", action="store_true", help="also the β sweep (upscale) and λ sweep (interpolate) + plots")
    p.add_argument(
        "--topk-table", action="store_true", help="also top-k × conservative: scores + agreement/TV vs exact"
    )
    p.add_argument("--threads", type=int, default=4, help="concurrent requests")
    _add_verbose_flag(p)
    p.set_defaults(func=cmd_eval)

    config = sub.add_parser("config", help="inspect the configuration tree")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="print the effective tree (the built-in defaults + --config) as YAML")
    p.add_argument("--config", help="YAML overlay (default: the built-in demo stack)")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("build-demo", help="build (or find) the demo model family")
    p.add_argument("--seed", type=int, default=0)
    _add_verbose_flag(p)
    p.set_defaults(func=cmd_build_demo)
    add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in QUIET_COMMANDS:
        from eft_serve.console import setup_output

        path = setup_output(args.command, verbose=args.verbose)
        print(f"[eft] library logs: {path}" + ("" if args.verbose else " (-v shows them here)"), flush=True)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # one line naming the file and the key path; nothing was started
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StartupError as e:  # one line naming the pool (or coordinator) and the cause; all stopped
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: whatever was started has been stopped on the way out (context managers).
        print("\n[eft] interrupted; everything it started is stopped", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
