"""The model family and prompts of `bench_engine.py`: a realistic-size random GPT-2 family built
locally (large_base 12 layers × 768, small_base and small_ft 4 × 256, context 1024, a 50,257-token
word-level tokenizer; no model hub), random word prompts distinct per stream, and the latency
quantile the tables print.
"""

from __future__ import annotations

from pathlib import Path

FAMILY = Path(__file__).resolve().parents[2] / "bench-out" / "engine_family"
VOCAB = 50257
CONTEXT = 1024
SHAPES = {"large_base": (12, 768, 12, 0), "small_base": (4, 256, 4, 1), "small_ft": (4, 256, 4, 2)}


def build_family() -> dict[str, str]:
    """Random GPT-2 family + a local word-level tokenizer (``t0`` … ``t50255``, ``<eos>``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    paths = {role: FAMILY / role for role in SHAPES}
    if all((p / "config.json").is_file() and (p / "tokenizer.json").is_file() for p in paths.values()):
        return {r: str(p) for r, p in paths.items()}
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t0")
    for role, (layers, width, heads, seed) in SHAPES.items():
        torch.manual_seed(seed)
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
        )
        paths[role].mkdir(parents=True, exist_ok=True)
        GPT2LMHeadModel(cfg).save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
        print(f"[bench] built {role}: {layers} layers × {width} at {paths[role]}", flush=True)
    return {r: str(p) for r, p in paths.items()}


def prompt(i: int, n: int, run: str = "") -> str:
    """A random ``n``-word prompt; distinct per (run, stream), so no run reuses another's KV."""
    import random

    rng = random.Random(f"{run}/{i}")
    return " ".join(f"t{rng.randrange(VOCAB - 1)}" for _ in range(n))


def percentile_ms(sorted_s: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms (nan when empty)."""
    if not sorted_s:
        return float("nan")
    return 1000 * sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))]
