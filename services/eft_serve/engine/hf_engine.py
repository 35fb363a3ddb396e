"""The transformers engine: next-token logprobs and greedy drafts from one causal LM.

Owns (loading lives in ``hf_loading``, the layout probe in ``kv_layout``): validating
queries against it, keeping each sequence's KV in its own buffer (``SequenceKVStore``: a byte
budget, sized from memory when not configured, and admission so running sequences are never
evicted), batching queries into padded forward passes, and turning logits into boundary records
(via ``logprob_view``). It is the exact reference engine: every layout computes what a plain
forward of the whole prefix computes, up to float rounding.

Does NOT know: transports, replicas, queues and waiting (``EngineRunner`` waits on ``admit``),
result caches, merging or sampling. It works on token ids; the tokenizer is read only for the
vocabulary fingerprint and the EOS id.

KV layouts (``kv_layout``, chosen at load):

* ``rows`` (the default for models on transformers' ``sdpa`` or ``eager`` attention whose row
  kernel passes the load-time probe; sliding windows and soft-capping included): a batched forward feeds
  only the new tokens, right-padded to ``L``; each layer writes row ``i``'s new keys/values in
  place into that sequence's buffer and attends per row to that buffer's first ``c_i + l_i``
  positions (``row_attention``). No past is copied per step (``bench_engine.py --step-cost``).
* ``gather`` (models whose attention is neither, or fails the load-time probe): the rows'
  buffers are gathered into one padded past per forward (a copy of every past), and only the new
  positions are written back. Layout of that padded forward (``P`` = longest cached prefix in the
  batch, ``L`` = most new tokens)::

    keys:   [ pad (P - c_i) | cached c_i ][ new l_i | pad (L - l_i) ]
    mask:   [     0         |    1       ][   1     |      0        ]

Cached KV is left-padded so every row's past ends at ``P``; new tokens are right-padded so a real
token never sits behind padding (no query row is ever fully masked, which some attention kernels
turn into NaN) and pad tokens come after every real one (causality hides them). Explicit
``position_ids`` give each new token its true position ``c_i + j``, so a row's numbers do not depend
on its neighbours beyond float rounding.

* ``off`` (``kv_cache_bytes: 0``, or layers that are neither full nor sliding-window attention):
  every call is a plain padded forward of the whole prefix, no KV kept — the independent reference
  in tests. (``rows`` and ``gather`` keep a sliding-window layer's whole KV; its window is a mask.)

The constructor's ``kv_layout`` forces one (tests compare them; see docs/architectures.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from eft_serve.engine.cpu_head import enable_cpu_decode_head
from eft_serve.engine.hf_loading import DTYPES, load_hf_model, resolve_device
from eft_serve.engine.hf_rows import CallRow, EngineCounters, plan_forward_groups
from eft_serve.engine.kv_budget import auto_kv_cache_bytes
from eft_serve.engine.kv_cache import cache_from_kv_layers, kv_layers_from_cache
from eft_serve.engine.kv_layout import enable_rows_if_exact, kv_geometry, kv_reuse_supported
from eft_serve.engine.logprob_view import (
    build_position_logprobs,
    candidate_rows,
    validate_draft_queries,
    validate_logprob_top_k,
    validate_queries,
)
from eft_serve.engine.lora import LoraSet
from eft_serve.engine.row_attention import RowSlots, row_forward_kwargs
from eft_serve.engine.sequence_kv import Admission, KVGeometry, Lease, SequenceKVStore
from eft_serve.engine.types import DraftQuery, EngineBase, ModelInfo, SequenceQuery, SequenceResult, kv_sequence_id

__all__ = ["HFEngine", "EngineCounters", "resolve_device", "DTYPES", "KV_LAYOUTS"]

# "auto": rows if the row kernel passes its probe, else gather, else off. The others force one
# (tests compare layouts; a forced layout the model cannot run is refused at construction).
KV_LAYOUTS = ("auto", "rows", "gather", "off")

log = logging.getLogger(__name__)


class HFEngine(EngineBase):
    """A ``LogprobEngine`` over a transformers causal LM. Thread-safe for concurrent calls."""

    def __init__(
        self,
        model: Any,
        info: ModelInfo,
        *,
        kv_cache_bytes: int | None = None,
        memory_bytes: int | None = None,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        input_vocab_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        kv_layout: str = "auto",
        lora: LoraSet | None = None,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {kv_layout!r}")
        self.model = model
        self._info = info
        self.lora = lora  # co-located adapters: each row of a forward runs its own (engine.lora)
        self.device = next(model.parameters()).device
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.input_vocab_size = input_vocab_size or info.vocab_size
        params = inspect.signature(model.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` in 5.x; accept either.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._pad_id = 0  # any valid id: padded positions are masked and their outputs dropped
        # Decode steps on CPU: the output head's few-row product on MKL's fast path (cpu_head).
        info.extra["lm_head"] = "cpu_decode" if enable_cpu_decode_head(model) else "model"

        keeps_kv = kv_layout != "off" and kv_reuse_supported(model)
        geometry = kv_geometry(model, info.max_context) if keeps_kv else None
        self.kv_reuse = geometry is not None
        if kv_layout in ("rows", "gather") and not self.kv_reuse:
            raise ValueError(
                f"{info.name}: kv_layout {kv_layout!r} needs per-sequence KV, which this model's layers cannot keep"
            )
        if not self.kv_reuse:
            if kv_layout != "off":
                log.warning("%s: cache layers cannot be kept per sequence; prefix KV reuse is off", info.name)
            geometry = KVGeometry(0, 0, 0, torch.float32, self.device, info.max_context)
        assert geometry is not None
        auto = kv_cache_bytes is None
        if kv_cache_bytes is None:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_cache_bytes = auto_kv_cache_bytes(self.device, weights, memory_bytes)
        self.kv_cache = SequenceKVStore(kv_cache_bytes if self.kv_reuse else 0, geometry, clock=clock)
        # "rows": per-sequence buffers, per-row attention (no past copied per step); "gather": the
        # same buffers gathered into a padded past per forward (models whose attention cannot take
        # the row kernel); "off": no KV kept, every call is a plain forward.
        self.kv_layout = "off"
        if self.kv_reuse and self.kv_cache.max_bytes > 0:
            use_rows = kv_layout != "gather" and enable_rows_if_exact(
                self.model, self.kv_cache.geometry, self.input_vocab_size, info.max_context, info.name
            )
            self.kv_layout = "rows" if use_rows else "gather"
        if kv_layout not in ("auto", self.kv_layout):
            raise ValueError(
                f"{info.name}: kv_layout {kv_layout!r} asked for, but this model runs {self.kv_layout!r} "
                f"(the row kernel failed its probe, or the KV budget is 0)"
            )
        info.extra["kv_cache_bytes"] = str(self.kv_cache.max_bytes)
        info.extra["kv_layout"] = self.kv_layout
        log.info(
            "%s: KV budget %.1f MiB (%s), %d bytes per position, layout %s",
            info.name,
            self.kv_cache.max_bytes / 2**20,
            "auto" if auto else "configured",
            geometry.bytes_per_token,
            self.kv_layout,
        )
        self.counters = EngineCounters()
        self._counters_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str,
        dtype: str = "float32",
        device: str = "auto",
        kv_cache_bytes: int | None = None,
        memory_bytes: int | None = None,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        torch_threads: int | None = 1,
        tokenizer_dir: str | Path | None = None,
        model_fingerprint: str | None = None,
        max_context: int | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        merge_adapter: str | Path | None = None,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> HFEngine:
        """Load a local transformers model directory.

        ``model_fingerprint`` skips hashing the weights (large checkpoints take a while);
        ``max_context`` overrides the config's position limit (e.g. to cap memory).
        ``kv_cache_bytes``: the KV budget; ``None`` sizes it from ``memory_bytes`` (the replica's
        memory) or the memory free now (``kv_budget``).
        ``merge_adapter``: a LoRA adapter directory over this base, merged in (the pool serves the
        fine-tune); ``adapters``: name -> adapter directory, co-located (queries pick one by name).
        """
        model, info, lora, input_vocab = load_hf_model(
            model_dir,
            name=name,
            dtype=dtype,
            device=device,
            torch_threads=torch_threads,
            tokenizer_dir=tokenizer_dir,
            model_fingerprint=model_fingerprint,
            max_context=max_context,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            merge_adapter=merge_adapter,
            adapters=adapters,
        )
        return cls(
            model,
            info,
            kv_cache_bytes=kv_cache_bytes,
            memory_bytes=memory_bytes,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            input_vocab_size=input_vocab,
            lora=lora,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # --------------------------------------------------------------- protocol
    def admit(self, demands: Sequence[tuple[str, int]]) -> Admission:
        """Whether ``(sequence_id, positions)`` fit the KV budget now without evicting a running
        sequence; the fitting ones are pinned (see ``sequence_kv``). Never waits."""
        return self.kv_cache.admit(demands)

    def uncached_tokens(self, query: SequenceQuery) -> int | None:
        """Positions a call for ``query`` would feed now (its prefix not yet in the sequence's KV);
        None when this engine keeps no KV for it (chunking a prefill would then gain nothing)."""
        if self.kv_layout == "off" or not query.sequence_id:
            return None
        tokens = np.asarray(query.token_ids, dtype=np.int64)
        kv_id = kv_sequence_id(query.sequence_id, query.adapter)
        return int(tokens.shape[0]) - self.kv_cache.cached_length(kv_id, tokens)

    @torch.inference_mode()
    def next_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]:
        validate_logprob_top_k(logprob_top_k)
        checked = validate_queries(
            queries,
            vocab_size=self._info.vocab_size,
            max_context=self._info.max_context,
            model=self._info.name,
            input_vocab_size=self.input_vocab_size,
        )
        if not queries:
            return []
        rows: list[CallRow] = []
        try:
            for q, (toks, _cands) in zip(queries, checked):
                m = int(q.num_positions)
                # At least the last m tokens must be fed: their logits are the answer.
                rows.append(self._row(toks, q.sequence_id, m, adapter=self._adapter(q.adapter)))
            outputs = self._run_rows(rows)
        finally:
            self._release(rows)

        lp_rows: list[torch.Tensor] = []
        cand_rows: list[np.ndarray] = []
        for q, (_toks, cands), lp in zip(queries, checked, outputs):
            lp_rows.append(lp)
            cand_rows.extend(candidate_rows(q, cands))
        positions = build_position_logprobs(torch.cat(lp_rows, dim=0), logprob_top_k, cand_rows)
        results: list[SequenceResult] = []
        start = 0
        for row in rows:
            results.append(SequenceResult(positions[start : start + row.num_logits], cached_tokens=row.cached_len))
            start += row.num_logits
        return results

    @torch.inference_mode()
    def draft(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Greedy extension of each prefix by ``num_tokens`` (EOS is not special: exactly
        ``num_tokens`` ids come back; the caller decides where a draft ends)."""
        prefixes = validate_draft_queries(
            queries,
            vocab_size=self._info.vocab_size,
            max_context=self._info.max_context,
            model=self._info.name,
            input_vocab_size=self.input_vocab_size,
        )
        drafted: list[list[int]] = [[] for _ in queries]
        rows: dict[int, CallRow] = {}
        try:
            for i, (q, toks) in enumerate(zip(queries, prefixes)):
                if q.num_tokens > 0:
                    rows[i] = self._row(toks, q.sequence_id, 1, adapter=self._adapter(q.adapter))
            while rows:
                order = list(rows)
                outputs = self._run_rows([rows[i] for i in order])
                for i, lp in zip(order, outputs):
                    row = rows[i]
                    # A draft token must also be a valid *input* id for the next step.
                    nxt = int(torch.argmax(lp[-1, : self.input_vocab_size]).item())
                    drafted[i].append(nxt)
                    if len(drafted[i]) >= queries[i].num_tokens:
                        # The last drafted token was never fed; the KV of what was is kept.
                        del rows[i]
                        continue
                    tokens = np.append(row.tokens, np.int64(nxt))
                    rows[i] = self._row(tokens, queries[i].sequence_id, 1, row.lease, row.adapter)
        finally:
            self._release(list(rows.values()))
        return drafted

    # ----------------------------------------------------------------- internals
    def _adapter(self, adapter: str) -> str:
        """``adapter`` if this engine serves it (ValueError: INVALID_ARGUMENT otherwise)."""
        if adapter and self.lora is None:
            raise ValueError(f"{self._info.name} serves no LoRA adapters; got adapter {adapter!r}")
        if self.lora is not None:
            self.lora.check(adapter)
        return adapter

    def _row(
        self,
        toks: np.ndarray,
        sequence_id: str,
        num_logits: int,
        continue_from: Lease | None = None,
        adapter: str = "",
    ) -> CallRow:
        if self.kv_layout == "off":
            return CallRow(toks, 0, num_logits, None, adapter=adapter)
        # An adapter's KV is its own: kept under its own id, never shared with the base's rows.
        kv_id = kv_sequence_id(sequence_id, adapter)
        lease = self.kv_cache.acquire(kv_id, toks, len(toks) - num_logits, continue_from, namespace=adapter)
        return CallRow(toks, lease.start, num_logits, lease, adapter=adapter)

    def _release(self, rows: Sequence[CallRow]) -> None:
        """Hand back leases a failed call did not commit (committed ones are cleared)."""
        for r in rows:
            if r.lease is not None and not r.committed:
                self.kv_cache.release(r.lease)
                r.committed = True

    def _run_rows(self, rows: Sequence[CallRow]) -> list[torch.Tensor]:
        """Forward every row: float32 logprobs ``[num_logits, V]`` per row; each row's KV is
        written into its lease's buffer and committed to the store."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in plan_forward_groups(rows, self.max_batch_size, self.max_batch_tokens, self.kv_layout != "rows"):
            for i, lp in zip(group, self._forward_group([rows[i] for i in group])):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _gathered_past(self, rows: Sequence[CallRow], p: int) -> DynamicCache:
        """The gather layout: every row's cached past, left-padded to ``p``, in one new cache."""
        layers = []
        geometry = self.kv_cache.geometry
        for li in range(geometry.layers):
            shape = (len(rows), geometry.kv_heads, p, geometry.head_dim)
            k = torch.zeros(shape, dtype=geometry.dtype, device=self.device)
            v = torch.zeros(shape, dtype=geometry.dtype, device=self.device)
            for bi, r in enumerate(rows):
                if r.lease is not None and r.cached_len > 0:
                    k[bi, :, p - r.cached_len :, :] = r.lease.buf[li, 0, :, : r.cached_len]
                    v[bi, :, p - r.cached_len :, :] = r.lease.buf[li, 1, :, : r.cached_len]
            layers.append((k, v))
        with self._counters_lock:
            self.counters.gathered_tokens += sum(r.cached_len for r in rows)
        return cache_from_kv_layers(tuple(layers))

    def _forward_group(self, rows: Sequence[CallRow]) -> list[torch.Tensor]:
        b = len(rows)
        rows_layout = self.kv_layout == "rows"
        # Row layout: no padded past at all (each row attends into its own buffer).
        p = 0 if rows_layout else max(r.cached_len for r in rows)
        new_lens = [r.new_len for r in rows]
        l_max = max(new_lens)
        input_ids = np.full((b, l_max), self._pad_id, dtype=np.int64)
        position_ids = np.zeros((b, l_max), dtype=np.int64)
        mask = np.zeros((b, p + l_max), dtype=np.int64)
        for i, (r, n_new) in enumerate(zip(rows, new_lens)):
            c = r.cached_len
            input_ids[i, :n_new] = r.tokens[c:]
            position_ids[i, :n_new] = np.arange(c, c + n_new)
            mask[i, p - c : p + n_new] = 1  # unused by the row layout (p = 0 there)
        # Logits only where some row needs them: new-segment positions [lo, l_max).
        lo = min(n_new - r.num_logits for r, n_new in zip(rows, new_lens))
        dev = self.device
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(dev),
            "position_ids": torch.from_numpy(position_ids).to(dev),
        }
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = l_max - lo
        if rows_layout:
            leases = [r.lease for r in rows]
            assert all(le is not None for le in leases)
            slots = RowSlots([le.buf for le in leases if le is not None], [r.cached_len for r in rows], new_lens)
            kwargs.update(row_forward_kwargs(slots, b, dev))
            kwargs["use_cache"] = True
        elif self.kv_layout == "gather":
            kwargs["attention_mask"] = torch.from_numpy(mask).to(dev)
            kwargs["use_cache"] = True
            kwargs[self._cache_kw] = self._gathered_past(rows, p) if p > 0 else DynamicCache()
        else:
            kwargs["attention_mask"] = torch.from_numpy(mask).to(dev)
            kwargs["use_cache"] = False
        adapters = self.lora.rows([r.adapter for r in rows]) if self.lora else contextlib.nullcontext()
        with adapters:
            out = self.model(**kwargs)
        logits = out.logits
        offset = lo if self._has_logits_to_keep else 0
        picked = torch.cat(
            [logits[i, n - r.num_logits - offset : n - offset] for i, (r, n) in enumerate(zip(rows, new_lens))]
        )
        # Normalize in float32 whatever the model dtype (merged logprobs are compared across pools),
        # over the tokenizer's ids only: padded head rows never enter a distribution.
        lp = torch.log_softmax(picked[:, : self._info.vocab_size].float(), dim=-1)

        if self.kv_layout == "gather":
            # Only the new positions go back into each row's buffer (the past is already there).
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            layers = kv_layers_from_cache(cache)
            for i, (r, n_new) in enumerate(zip(rows, new_lens)):
                if r.lease is None:
                    continue
                c = r.cached_len
                for li, (k, v) in enumerate(layers):
                    r.lease.buf[li, 0, :, c : c + n_new] = k[i, :, p : p + n_new]
                    r.lease.buf[li, 1, :, c : c + n_new] = v[i, :, p : p + n_new]
        for r in rows:
            if r.lease is not None:
                self.kv_cache.commit(r.lease, r.tokens)
                r.committed = True

        with self._counters_lock:
            counters = self.counters
            counters.forward_passes += 1
            counters.rows += b
            counters.new_tokens += sum(new_lens)
            counters.padded_tokens += b * l_max
            counters.cached_tokens += sum(r.cached_len for r in rows)

        results: list[torch.Tensor] = []
        start = 0
        for r in rows:
            results.append(lp[start : start + r.num_logits])
            start += r.num_logits
        return results
