"""`eft demo`: the main job — start the stack and answer held-out questions side by side.

Owns the demo's choreography and printing: for questions about entities never seen in
fine-tuning, stream the answer of the small fine-tuned model, the large base, and the
up-scaled combination over real gRPC, and mark knowledge (correct fact) and behaviour (style).

Sits above both the demo family (`eft_serve.demo`, which knows nothing of the service) and the
stack (`eft_serve.stack`); does NOT know how either works inside, only how to start them and ask.
"""

from __future__ import annotations

import sys
from typing import TextIO

import grpc

from eft_serve.client import EftClient
from eft_serve.config import EftConfig
from eft_serve.demo.family import DemoFamily, ensure_demo_family
from eft_serve.preflight import preflight
from eft_serve.stack import local_stack

SHOWN = [
    ("small_ft", "small fine-tuned"),
    ("large_base", "large base"),
    ("upscale", "up-scaled (EFT)"),
]


def show_side_by_side(
    address: str, family: DemoFamily, n_prompts: int = 4, max_new_tokens: int = 40, out: TextIO = sys.stdout
) -> dict[str, dict[str, int]]:
    """Stream each recipe's answers to held-out questions; returns per-recipe fact/style tallies."""
    # One question per entity (they come three to an entity), so the demo shows several entities.
    questions = family.world.held_out_questions()[::3][:n_prompts]
    tally = {recipe: {"fact": 0, "style_a": 0} for recipe, _ in SHOWN}
    with EftClient(address, timeout=300) as client:
        print("\nHeld-out questions (entities never seen in fine-tuning), greedy, streamed over gRPC:\n", file=out)
        for q in questions:
            print(f"{q.prompt.splitlines()[0]}   (true answer: {q.answer})", file=out)
            for recipe, label in SHOWN:
                print(f"  {label:18s}|", end="", flush=True, file=out)
                text: list[str] = []
                for msg in client.generate(
                    q.prompt, recipe=recipe, temperature=0, max_new_tokens=max_new_tokens, stop=["\n"]
                ):
                    text.append(msg.text)
                    print(msg.text, end="", flush=True, file=out)
                    if msg.HasField("usage"):
                        usage = msg.usage
                answer = "".join(text)
                correct = family.world.is_correct(q, answer)
                style = family.world.style_of(answer)
                tally[recipe]["fact"] += int(correct)
                tally[recipe]["style_a"] += int(style == "a")
                print(
                    f"   [{'fact ok' if correct else 'fact wrong'}; style {style}; {usage.tokens_per_s:.0f} tok/s]",
                    file=out,
                )
            print(file=out)
    n = len(questions)
    print(
        "  "
        + ", ".join(
            f"{label}: {tally[r]['fact']}/{n} facts, {tally[r]['style_a']}/{n} in style A" for r, label in SHOWN
        ),
        file=out,
    )
    return tally


def run_demo(cfg: EftConfig, http_port: int | None = None, n_prompts: int = 4) -> int:
    # A model flag that cannot serve is one line (`StartupError`, exit 2) before the demo family
    # is built or found, which can take minutes; `local_stack` runs the same checks again.
    preflight(cfg)
    family = ensure_demo_family(log=print)
    with local_stack(cfg, http_port=http_port, log=lambda m: print(f"[eft] {m}", flush=True)) as eff:
        try:
            show_side_by_side(f"127.0.0.1:{eff.grpc.port}", family, n_prompts)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    return 0
