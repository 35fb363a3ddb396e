"""`eft demo`: the main job — start the stack and answer held-out questions side by side.

Owns the demo's choreography and printing: for questions about entities never seen in
fine-tuning, stream the answer of the small fine-tuned model, the large base, and the
up-scaled combination over real gRPC, and mark knowledge (correct fact) and behaviour (style).
"""

from __future__ import annotations

import sys

import grpc

from eft_serve.config import EftConfig

SHOWN = [
    ("small_ft", "small fine-tuned"),
    ("large_base", "large base"),
    ("upscale", "up-scaled (EFT)"),
]


def run_demo(cfg: EftConfig, http_port: int = 8000, n_prompts: int = 4, max_new_tokens: int = 40) -> int:
    from eft_serve.client import EftClient
    from eft_serve.demo.family import ensure_demo_family
    from eft_serve.stack import local_stack

    family = ensure_demo_family(log=print)
    # One question per entity (they come three to an entity), so the demo shows several entities.
    questions = family.world.held_out_questions()[::3][:n_prompts]
    address = f"127.0.0.1:{cfg.grpc.port}"
    with local_stack(cfg, http_port=http_port, log=lambda m: print(f"[eft] {m}", flush=True)):
        with EftClient(address, timeout=300) as client:
            print("\nHeld-out questions (entities never seen in fine-tuning), greedy, streamed over gRPC:\n")
            for q in questions:
                print(f"{q.prompt.splitlines()[0]}   (true answer: {q.answer})")
                for recipe, label in SHOWN:
                    print(f"  {label:18s}|", end="", flush=True)
                    text: list[str] = []
                    try:
                        for msg in client.generate(q.prompt, recipe=recipe, temperature=0, max_new_tokens=max_new_tokens,
                                                   stop=["\n"]):
                            text.append(msg.text)
                            print(msg.text, end="", flush=True)
                            if msg.HasField("usage"):
                                usage = msg.usage
                    except grpc.RpcError as e:
                        print(f" error: {e.code().name}: {e.details()}", file=sys.stderr)
                        return 2
                    answer = "".join(text)
                    fact = "fact ok" if family.world.is_correct(q, answer) else "fact wrong"
                    print(f"   [{fact}; style {family.world.style_of(answer)}; {usage.tokens_per_s:.0f} tok/s]")
                print()
    return 0
