"""How close is top-k merging to the exact full-vocabulary merge? (in-process, teacher-forced)

Owns the measurement behind `tests/bench/bench_topk_accuracy.py` and the top-k table of
`eft eval`: along the *exact* greedy trajectory of each prompt (up-scaling recipe), at every
position it merges the models' top-k results (k per model; 0 = the full vocabulary) with and
without conservative decoding and compares to the exact, non-conservative merge:

* greedy agreement -- the merged argmax is the exact merged argmax;
* total variation  -- ½ Σ |p_exact − p_top-k| (a token outside the top-k support has p = 0).

Uses the engines and the merge core directly (no Ray, gRPC or Redis). Knows nothing about
the service or about scoring answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eft_serve.core.merge import MergedDistribution, merge_position
from eft_serve.engine.types import PositionLogprobs, SequenceQuery

Log = Callable[[str], None]


@dataclass(frozen=True)
class AccuracyRow:
    top_k: int  # 0 = exact
    conservative: bool
    agreement: float
    mean_tv: float
    positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def total_variation(exact: MergedDistribution, approx: MergedDistribution, vocab_size: int) -> float:
    """½ Σ |p − q| over the vocabulary; a token outside a support has probability 0 there."""
    p = np.zeros(vocab_size)
    q = np.zeros(vocab_size)
    p[exact.support] = np.exp(exact.logprobs)
    q[approx.support] = np.exp(approx.logprobs)
    return 0.5 * float(np.abs(p - q).sum())


def argmax_token(d: MergedDistribution) -> int:
    return int(d.support[int(np.argmax(d.logprobs))])


def measure(
    engines: Mapping[str, Any],
    recipe: Any,
    prompts_ids: Sequence[Sequence[int]],
    eos_token_id: int,
    ks: Sequence[int] = (5, 20, 100),
    max_tokens: int = 24,
    conservative_top_p: float = 0.9,
    stop_token_ids: Sequence[int] = (),
    log: Log = lambda _m: None,
) -> list[AccuracyRow]:
    """Rows for every k in `ks` plus exact (k = 0), conservative off and on.

    `engines`: role → engine with `next_token_logprobs` and `info`; `recipe`: a `ResolvedRecipe`.
    The trajectory is the exact greedy one; it ends at EOS, a stop token or `max_tokens`.
    """
    roles = recipe.roles
    vocab = next(iter(engines.values())).info.vocab_size
    ks = [int(k) for k in ks if int(k) != 0]
    cells: dict[tuple[int, bool], dict[str, list[float]]] = {
        (k, c): {"agree": [], "tv": []} for k in [*ks, 0] for c in (False, True)
    }
    stops = {eos_token_id, *stop_token_ids}
    for n, prompt in enumerate(prompts_ids):
        ids = list(prompt)
        for _ in range(max_tokens):
            query = [SequenceQuery(token_ids=list(ids))]
            # The pools' own top-k path (the same call a pool serves), once per k and role.
            results: dict[int, dict[str, PositionLogprobs]] = {
                k: {r: engines[r].next_token_logprobs(query, k)[0].positions[0] for r in roles} for k in [0, *ks]
            }
            exact = merge_position(recipe, results[0], vocab)
            best = argmax_token(exact)
            for conservative in (False, True):
                ctp = conservative_top_p if conservative else None
                for k in [0, *ks]:
                    approx = (
                        exact
                        if (k == 0 and not conservative)
                        else merge_position(recipe, results[k], vocab, conservative_top_p=ctp)
                    )
                    cell = cells[(k, conservative)]
                    cell["agree"].append(float(argmax_token(approx) == best))
                    cell["tv"].append(total_variation(exact, approx, vocab))
            if best in stops:
                break
            ids.append(best)
        if (n + 1) % 20 == 0:
            log(f"  top-k accuracy: {n + 1}/{len(prompts_ids)} prompts")
    return [
        AccuracyRow(
            top_k=k,
            conservative=c,
            agreement=float(np.mean(v["agree"])),
            mean_tv=float(np.mean(v["tv"])),
            positions=len(v["tv"]),
        )
        for (k, c), v in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0] == 0, kv[0][0]))
    ]


def measure_demo(
    family: Any,
    prompts: Sequence[str],
    ks: Sequence[int] = (5, 20, 100),
    max_tokens: int = 24,
    conservative_top_p: float = 0.9,
    log: Log = lambda _m: None,
) -> list[AccuracyRow]:
    """`measure` on the demo family's up-scaling recipe (β = 1); the newline ends an answer."""
    from transformers import AutoTokenizer

    from eft_serve.config import demo_config
    from eft_serve.core.recipe import resolve_recipe
    from eft_serve.engine.hf_engine import HFEngine

    recipe = resolve_recipe(demo_config().recipes, "upscale")
    engines = {r: HFEngine.load(family.paths[r], name=r, device="cpu") for r in recipe.roles}
    tok = AutoTokenizer.from_pretrained(family.tokenizer_path)
    newline = [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    return measure(
        engines,
        recipe,
        [tok.encode(p) for p in prompts],
        tok.eos_token_id,
        ks=ks,
        max_tokens=max_tokens,
        conservative_top_p=conservative_top_p,
        stop_token_ids=newline,
        log=log,
    )
