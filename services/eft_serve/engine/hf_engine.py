"""The transformers engine: next-token logprobs and greedy drafts from one causal LM.

Owns: loading a local transformers model (weights, dtype, device, thread count), validating
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
  positions (``row_attention``). No past is copied: a decode step of 8 cached 230-token GPT-2-small
  sequences moved ~400 MB of KV in the old gather layout (pad+copy every past, ``torch.cat`` it
  with the new positions, clone each row back out) and moves ~0.6 MB now. Measured in-process
  (``tests/bench/bench_engine.py``, 12 × 768 GPT-2, 200-token pasts, 1 CPU thread): a batch-8
  decode step 107 ms vs 158 ms with the old layout; batch 1 41 vs 43 ms.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from eft_serve.engine.cpu_head import enable_cpu_decode_head
from eft_serve.engine.fingerprint import model_fingerprint as _model_fingerprint
from eft_serve.engine.fingerprint import vocab_fingerprint as _vocab_fingerprint
from eft_serve.engine.kv_budget import auto_kv_cache_bytes
from eft_serve.engine.kv_cache import cache_from_kv_layers, kv_layers_from_cache
from eft_serve.engine.logprob_view import (
    build_position_logprobs,
    candidate_rows,
    tokenizer_support,
    validate_draft_queries,
    validate_logprob_top_k,
    validate_queries,
)
from eft_serve.engine.lora import LoraSet, apply_lora
from eft_serve.engine.row_attention import RowSlots, enable_row_attention, row_forward_kwargs
from eft_serve.engine.sequence_kv import Admission, KVGeometry, Lease, SequenceKVStore
from eft_serve.engine.types import DraftQuery, ModelInfo, SequenceQuery, SequenceResult, kv_sequence_id

__all__ = ["HFEngine", "EngineCounters", "resolve_device", "DTYPES", "KV_LAYOUTS"]

# "auto": rows if the row kernel passes its probe, else gather, else off. The others force one
# (tests compare layouts; a forced layout the model cannot run is refused at construction).
KV_LAYOUTS = ("auto", "rows", "gather", "off")

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def resolve_device(device: str) -> torch.device:
    """``auto`` = first CUDA device when there is one, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def _resolve_dtype(dtype: str) -> tuple[str, torch.dtype]:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name, DTYPES[name]


def _max_context(config: Any) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_id(tokenizer: Any, config: Any) -> int:
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return -1


def _kv_reuse_supported(model: Any) -> bool:
    """Prefix reuse needs every layer's attention to read plain keys/values of past positions:
    full layers, or sliding-window ones (the engine keeps their whole KV in its own buffers and
    the window is a mask: the model's own in ``gather``, ``row_attention``'s in ``rows``). Not
    chunked, linear-attention or quantized layers."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic configs: no prefix reuse, not a failure
        return False
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in probe.layers)


# The row kernel's load-time probe runs past a sliding window up to this long (a longer one is
# checked by which window each layer applies, not numerically: the probe would cost too much).
_WINDOW_PROBE_MAX = 64


def _sliding_windows(model: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model's own cache sees them."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic configs: checked by _kv_reuse_supported
        return []
    return [
        int(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in probe.layers
    ]


@dataclass
class EngineCounters:
    """Cumulative work counters (observability; tests use them to see batching happen)."""

    forward_passes: int = 0
    rows: int = 0
    # New tokens fed to the model, and the padded positions actually computed (B * L).
    new_tokens: int = 0
    padded_tokens: int = 0
    cached_tokens: int = 0
    # Past positions copied into a padded batch (the gather layout only; the row layout copies none).
    gathered_tokens: int = 0


@dataclass
class _Row:
    tokens: np.ndarray  # int64, the whole prefix
    cached_len: int  # positions whose KV the lease already holds
    num_logits: int  # trailing positions whose next-token distribution is wanted
    lease: Lease | None  # None: no KV kept (plain forward of the whole prefix)
    committed: bool = False  # the forward wrote and committed the lease (else released on failure)
    adapter: str = ""  # the co-located LoRA adapter this row runs ("" = the plain model)

    @property
    def new_len(self) -> int:
        return int(self.tokens.shape[0]) - self.cached_len


def _kv_geometry(model: Any, max_positions: int) -> KVGeometry | None:
    """KV shape from a 1-token probe; None when layers differ (no per-sequence buffers then)."""
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    try:
        layers = kv_layers_from_cache(cache)
    except (TypeError, ValueError):
        return None
    shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3], k.dtype) for k, v in layers}
    if len(shapes) != 1:
        return None
    heads, dim, v_heads, v_dim, dtype = shapes.pop()
    if (heads, dim) != (v_heads, v_dim):
        return None
    return KVGeometry(len(layers), int(heads), int(dim), dtype, dev, int(max_positions))


class HFEngine:
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

        keeps_kv = kv_layout != "off" and _kv_reuse_supported(model)
        geometry = _kv_geometry(model, info.max_context) if keeps_kv else None
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
            self.kv_layout = "rows" if kv_layout != "gather" and self._enable_rows() else "gather"
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

    def _enable_rows(self) -> bool:
        """Switch to the row kernel if, on a probe, it reproduces the model's own forward; else undo.

        The probe runs past the shortest sliding window when that is short (else the window's
        mask is checked only by which window each layer's kernel applied, against the model's
        sliding layers)."""
        windows = _sliding_windows(self.model)
        shortest = min((w for w in windows if w), default=None)
        n = min(max(8, shortest + 4 if shortest and shortest <= _WINDOW_PROBE_MAX else 8), self._info.max_context)
        toks = (torch.arange(n, device=self.device) * 7919) % self.input_vocab_size
        with torch.inference_mode():
            plain = self.model(input_ids=toks[None]).logits[0].float()  # the model's own kernel
        original = str(getattr(self.model.config, "_attn_implementation", "sdpa"))
        if not enable_row_attention(self.model):
            return False
        geometry = self.kv_cache.geometry
        buf = geometry.allocate(n)
        first = max(1, n - 3)
        slots = [RowSlots([buf], [0], [first]), RowSlots([buf], [first], [n - first])]
        try:
            with torch.inference_mode():
                parts = [
                    self.model(
                        input_ids=toks[None, s.starts[0] : s.starts[0] + s.lens[0]],
                        position_ids=torch.arange(s.starts[0], s.starts[0] + s.lens[0], device=self.device)[None],
                        use_cache=True,
                        **row_forward_kwargs(s, 1, self.device),
                    ).logits[0]
                    for s in slots
                ]
            rows = torch.cat(parts).float()
            tol = 1e-3 if geometry.dtype == torch.float32 else 5e-2
            close = torch.allclose(rows, plain, rtol=tol, atol=tol * max(1.0, float(plain.abs().max())))
            applied = all([s.windows.get(i) for i in range(len(windows))] == windows for s in slots)
        except Exception:  # a model whose attention the row kernel cannot take: gather instead
            log.warning("%s: the per-row attention kernel failed its probe", self._info.name, exc_info=True)
            close = applied = False
        if close and applied:
            return True
        log.warning(
            "%s: the per-row attention kernel disagrees with the model's own (%s); gathering the past",
            self._info.name,
            "logits" if not close else f"sliding windows: model {windows}, kernel {slots[0].windows}",
        )
        self.model.set_attn_implementation(original)
        return False

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
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a local transformers model directory (no config.json); download "
                f"it first, e.g. `hf download <repo> --local-dir {path}`"
            )
        if torch_threads is not None:
            # Process-wide: replicas run one engine per process, one thread each by default.
            torch.set_num_threads(int(torch_threads))
        dtype_name, torch_dtype = _resolve_dtype(dtype)
        dev = resolve_device(device)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        # Only a pool that grants it runs a checkpoint's own code (`trust_remote_code`).
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        base_fingerprint = model_fingerprint or _model_fingerprint(path)
        model, lora, fingerprint, adapter_fps = apply_lora(
            model, base_fingerprint, merge=merge_adapter, adapters=adapters
        )
        model.to(dev)  # type: ignore[arg-type]  # transformers' stubs type .to() as a dtype-only wrapper
        model.eval()  # type: ignore[no-untyped-call]
        tok_path = Path(tokenizer_dir) if tokenizer_dir is not None else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ValueError(
                f"could not load a tokenizer from {tok_path} (needed for the vocab fingerprint "
                f"and EOS id); pass tokenizer_dir=...: {exc}"
            ) from exc

        out_emb: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        head_rows = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        # The merge support is the tokenizer's ids: heads are often padded beyond it (Qwen2.5,
        # Pythia), and padded rows are never real tokens.
        vocab_size = tokenizer_support(len(tokenizer), head_rows, path)
        in_emb: Any = model.get_input_embeddings()
        input_vocab = int(in_emb.weight.shape[0]) if in_emb is not None else vocab_size
        ctx = max_context or _max_context(model.config)
        if ctx is None:
            raise ValueError(f"{path}: config names no max positions; pass max_context=...")
        info = ModelInfo(
            name=name,
            vocab_size=vocab_size,
            max_context=int(ctx),
            eos_token_id=_eos_id(tokenizer, model.config),
            vocab_fingerprint=_vocab_fingerprint(tokenizer),
            model_fingerprint=fingerprint,
            dtype=dtype_name,
            device=str(dev),
            num_parameters=sum(p.numel() for p in model.parameters()),
            extra={
                "model_dir": str(path.resolve()),
                "attn_implementation": str(getattr(model.config, "_attn_implementation", "")),
                "kv_reuse": "1" if _kv_reuse_supported(model) else "0",
                "head_rows": str(head_rows),
                **({"merged_adapter": str(Path(merge_adapter).resolve())} if merge_adapter is not None else {}),
            },
            adapters=adapter_fps,
        )
        return cls(
            model,
            info,
            kv_cache_bytes=kv_cache_bytes,
            memory_bytes=memory_bytes,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            input_vocab_size=min(input_vocab, vocab_size),
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
        rows: list[_Row] = []
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
        rows: dict[int, _Row] = {}
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
    ) -> _Row:
        if self.kv_layout == "off":
            return _Row(toks, 0, num_logits, None, adapter=adapter)
        # An adapter's KV is its own: kept under its own id, never shared with the base's rows.
        kv_id = kv_sequence_id(sequence_id, adapter)
        lease = self.kv_cache.acquire(kv_id, toks, len(toks) - num_logits, continue_from, namespace=adapter)
        return _Row(toks, lease.start, num_logits, lease, adapter=adapter)

    def _release(self, rows: Sequence[_Row]) -> None:
        """Hand back leases a failed call did not commit (committed ones are cleared)."""
        for r in rows:
            if r.lease is not None and not r.committed:
                self.kv_cache.release(r.lease)
                r.committed = True

    def _plan_groups(self, rows: Sequence[_Row]) -> list[list[int]]:
        """Group rows into forward passes: similar new lengths, bounded padded size.

        Sorted by new length, a row joins the current group while the padded batch
        ``B * (P + L)`` stays within ``max_batch_tokens`` and the longest new segment is at most
        ``max(2 * shortest, shortest + 16)`` (bounds padding waste). A single oversized row still
        runs, alone. The row layout materialises no padded past, so ``P`` counts as 0 there.
        """
        padded_past = self.kv_layout != "rows"
        order = sorted(range(len(rows)), key=lambda i: (rows[i].new_len, rows[i].cached_len))
        groups: list[list[int]] = []
        cur: list[int] = []
        min_l = max_l = max_p = 0
        for i in order:
            n_new, c = rows[i].new_len, (rows[i].cached_len if padded_past else 0)
            if cur:
                b2, p2, l2 = len(cur) + 1, max(max_p, c), max(max_l, n_new)
                if (
                    b2 <= self.max_batch_size
                    and b2 * (p2 + l2) <= self.max_batch_tokens
                    and l2 <= max(2 * min_l, min_l + 16)
                ):
                    cur.append(i)
                    max_p, max_l = p2, l2
                    continue
                groups.append(cur)
            cur, min_l, max_l, max_p = [i], n_new, n_new, c
        if cur:
            groups.append(cur)
        return groups

    def _run_rows(self, rows: Sequence[_Row]) -> list[torch.Tensor]:
        """Forward every row: float32 logprobs ``[num_logits, V]`` per row; each row's KV is
        written into its lease's buffer and committed to the store."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in self._plan_groups(rows):
            for i, lp in zip(group, self._forward_group([rows[i] for i in group])):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _gathered_past(self, rows: Sequence[_Row], p: int) -> DynamicCache:
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

    def _forward_group(self, rows: Sequence[_Row]) -> list[torch.Tensor]:
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
