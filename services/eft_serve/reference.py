"""An independent in-process reference for EFT decoding, used by exactness tests and benchmarks.

Owns the plainest possible computation of greedy EFT: plain transformers forward passes, full
vocabulary, `score = Σ_i c_i · log_softmax(logits_i)`, argmax. Shares no code with the engine,
the merge core or the coordinator, so agreement with them means something.

``support``: the ids merged (``len(tokenizer)``), for output heads padded beyond the tokenizer
(Pythia, Qwen2.5: padded rows are no token): each model's logits are cut to ``[:support]`` before
its log-softmax. None: every head row (all heads must then have the same rows).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


class ReferenceEFT:
    def __init__(
        self,
        model_dirs: Mapping[str, Path],
        coefficients: Mapping[str, float],
        use_kv_cache: bool = False,
        support: int | None = None,
    ) -> None:
        self.coefficients = dict(coefficients)
        self.use_kv_cache = use_kv_cache
        self.support = support
        self.models = {}
        for role in self.coefficients:
            model = AutoModelForCausalLM.from_pretrained(model_dirs[role], dtype=torch.float32)
            model.eval()
            self.models[role] = model

    @torch.inference_mode()
    def greedy(
        self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | Collection[int] | None = None
    ) -> tuple[list[int], list[float]]:
        """Generated ids and the wall time of each token (seconds); stops after any id in
        `eos_token_id` (one id or several: every stop id of the recipe's models)."""
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        ids = list(prompt_ids)
        out: list[int] = []
        times: list[float] = []
        past: dict[str, object] = {}
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            score = None
            for role, coef in self.coefficients.items():
                model = self.models[role]
                if self.use_kv_cache and role in past:
                    res = model(torch.tensor([ids[-1:]]), past_key_values=past[role], use_cache=True)
                else:
                    res = model(torch.tensor([ids]), use_cache=self.use_kv_cache)
                if self.use_kv_cache:
                    past[role] = res.past_key_values
                lp = torch.log_softmax(res.logits[0, -1, : self.support].float(), dim=-1).double()
                score = coef * lp if score is None else score + coef * lp
            assert score is not None
            token = int(torch.argmax(score))
            times.append(time.perf_counter() - t0)
            out.append(token)
            if token in stops:
                break
            ids.append(token)
        return out, times
