"""The transformers engine: next-token logprobs and greedy drafts from one causal LM.

Owns: loading a local transformers model (weights, dtype, device, thread count), validating
queries against it, reusing prefix KV states from a ``PrefixKVCache``, batching queries into
padded forward passes, and turning logits into boundary records (via ``logprob_view``).

Does NOT know: transports, replicas, result caches, merging or sampling. It works on token ids;
the tokenizer is read only for the vocabulary fingerprint and the EOS id.

Batched forward layout (one row per query, ``P`` = longest cached prefix in the batch, ``L`` =
most new tokens)::

    keys:   [ pad (P - c_i) | cached c_i ][ new l_i | pad (L - l_i) ]
    mask:   [     0         |    1       ][   1     |      0        ]

Cached KV is left-padded so every row's past ends at ``P``; new tokens are right-padded so a real
token never sits behind padding (no query row is ever fully masked, which some attention kernels
turn into NaN) and pad tokens come after every real one (causality hides them). Explicit
``position_ids`` give each new token its true position ``c_i + j``, so a row's numbers do not depend
on its neighbours beyond float rounding.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from eft_serve.engine.fingerprint import model_fingerprint as _model_fingerprint
from eft_serve.engine.fingerprint import vocab_fingerprint as _vocab_fingerprint
from eft_serve.engine.kv_cache import (
    KVLayers,
    PrefixKVCache,
    cache_from_kv_layers,
    kv_layers_from_cache,
)
from eft_serve.engine.logprob_view import (
    build_position_logprobs,
    validate_draft_queries,
    validate_logprob_top_k,
    validate_queries,
)
from eft_serve.engine.types import DraftQuery, ModelInfo, SequenceQuery, SequenceResult

__all__ = ["HFEngine", "EngineCounters", "resolve_device", "DTYPES"]

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
    """Prefix reuse needs every layer to keep full, croppable KV (no sliding/linear layers)."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic configs: no prefix reuse, not a failure
        return False
    return all(type(layer) is DynamicLayer for layer in probe.layers)


@dataclass
class EngineCounters:
    """Cumulative work counters (observability; tests use them to see batching happen)."""

    forward_passes: int = 0
    rows: int = 0
    # New tokens fed to the model, and the padded positions actually computed (B * L).
    new_tokens: int = 0
    padded_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Row:
    tokens: np.ndarray  # int64, the whole prefix
    cached_len: int  # positions covered by ``past``
    past: KVLayers | None
    num_logits: int  # trailing positions whose next-token distribution is wanted

    @property
    def new_len(self) -> int:
        return int(self.tokens.shape[0]) - self.cached_len


class HFEngine:
    """A ``LogprobEngine`` over a transformers causal LM. Thread-safe for concurrent calls."""

    def __init__(
        self,
        model: Any,
        info: ModelInfo,
        *,
        kv_cache_bytes: int = 64 << 20,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        input_vocab_size: int | None = None,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
        self.model = model
        self._info = info
        self.device = next(model.parameters()).device
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.input_vocab_size = input_vocab_size or info.vocab_size
        self.kv_reuse = _kv_reuse_supported(model)
        if not self.kv_reuse:
            log.warning("%s: cache layers are not all full attention; prefix KV reuse is off", info.name)
        self.kv_cache = PrefixKVCache(kv_cache_bytes if self.kv_reuse else 0)
        self.counters = EngineCounters()
        self._counters_lock = threading.Lock()
        params = inspect.signature(model.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` in 5.x; accept either.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._pad_id = 0  # any valid id: padded positions are masked and their outputs dropped

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        name: str,
        dtype: str = "float32",
        device: str = "auto",
        kv_cache_bytes: int = 64 << 20,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        torch_threads: int | None = 1,
        tokenizer_dir: str | Path | None = None,
        model_fingerprint: str | None = None,
        max_context: int | None = None,
        attn_implementation: str | None = None,
    ) -> HFEngine:
        """Load a local transformers model directory.

        ``model_fingerprint`` skips hashing the weights (large checkpoints take a while);
        ``max_context`` overrides the config's position limit (e.g. to cap memory).
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
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.to(dev)  # type: ignore[arg-type]  # transformers' stubs type .to() as a dtype-only wrapper
        model.eval()  # type: ignore[no-untyped-call]
        tok_path = Path(tokenizer_dir) if tokenizer_dir is not None else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as exc:
            raise ValueError(
                f"could not load a tokenizer from {tok_path} (needed for the vocab fingerprint "
                f"and EOS id); pass tokenizer_dir=...: {exc}"
            ) from exc

        out_emb: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
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
            model_fingerprint=model_fingerprint or _model_fingerprint(path),
            dtype=dtype_name,
            device=str(dev),
            num_parameters=sum(p.numel() for p in model.parameters()),
            extra={
                "model_dir": str(path.resolve()),
                "attn_implementation": str(getattr(model.config, "_attn_implementation", "")),
                "kv_reuse": "1" if _kv_reuse_supported(model) else "0",
            },
        )
        return cls(
            model,
            info,
            kv_cache_bytes=kv_cache_bytes,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=max_batch_size,
            input_vocab_size=min(input_vocab, vocab_size),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # --------------------------------------------------------------- protocol
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
        for q, (toks, _cands) in zip(queries, checked):
            m = int(q.num_positions)
            # At least the last m tokens must be fed: their logits are the answer.
            cached, past = self._lookup(toks, q.sequence_id, max_len=len(toks) - m)
            rows.append(_Row(toks, cached, past, m))
        outputs = self._run_rows(rows)

        lp_rows: list[torch.Tensor] = []
        cand_rows: list[np.ndarray] = []
        for q, (_toks, cands), row, (lp, layers) in zip(queries, checked, rows, outputs):
            lp_rows.append(lp)
            cand_rows.extend([cands] * row.num_logits)
            if layers is not None:
                self.kv_cache.store(row.tokens, layers, q.sequence_id)
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
        for i, (q, toks) in enumerate(zip(queries, prefixes)):
            if q.num_tokens > 0:
                cached, past = self._lookup(toks, q.sequence_id, max_len=len(toks) - 1)
                rows[i] = _Row(toks, cached, past, 1)
        while rows:
            order = list(rows)
            outputs = self._run_rows([rows[i] for i in order])
            for i, (lp, layers) in zip(order, outputs):
                row = rows[i]
                # A draft token must also be a valid *input* id for the next step.
                nxt = int(torch.argmax(lp[-1, : self.input_vocab_size]).item())
                drafted[i].append(nxt)
                if len(drafted[i]) >= queries[i].num_tokens:
                    # The last drafted token was never fed; keep KV of what was.
                    if layers is not None:
                        self.kv_cache.store(row.tokens, layers, queries[i].sequence_id)
                    del rows[i]
                    continue
                tokens = np.append(row.tokens, np.int64(nxt))
                if layers is not None:
                    rows[i] = _Row(tokens, len(row.tokens), layers, 1)
                else:
                    rows[i] = _Row(tokens, 0, None, 1)
        return drafted

    # ----------------------------------------------------------------- internals
    def _lookup(self, toks: np.ndarray, sequence_id: str, max_len: int) -> tuple[int, KVLayers | None]:
        if not self.kv_reuse or max_len <= 0:
            return 0, None
        return self.kv_cache.lookup_layers(toks, sequence_id, max_len=max_len)

    def _plan_groups(self, rows: Sequence[_Row]) -> list[list[int]]:
        """Group rows into forward passes: similar new lengths, bounded padded size.

        Sorted by new length, a row joins the current group while the padded batch
        ``B * (P + L)`` stays within ``max_batch_tokens`` and the longest new segment is at most
        ``max(2 * shortest, shortest + 16)`` (bounds padding waste). A single oversized row still
        runs, alone.
        """
        order = sorted(range(len(rows)), key=lambda i: (rows[i].new_len, rows[i].cached_len))
        groups: list[list[int]] = []
        cur: list[int] = []
        min_l = max_l = max_p = 0
        for i in order:
            n_new, c = rows[i].new_len, rows[i].cached_len
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

    def _run_rows(self, rows: Sequence[_Row]) -> list[tuple[torch.Tensor, KVLayers | None]]:
        """Forward every row; per row: float32 logprobs ``[num_logits, V]`` and the KV of its
        whole prefix (``None`` when reuse is off)."""
        out: list[tuple[torch.Tensor, KVLayers | None] | None] = [None] * len(rows)
        for group in self._plan_groups(rows):
            for i, res in zip(group, self._forward_group([rows[i] for i in group])):
                out[i] = res
        return out  # type: ignore[return-value]

    def _batched_past(self, rows: Sequence[_Row], p: int) -> DynamicCache:
        if len(rows) == 1 and rows[0].cached_len == p and rows[0].past is not None:
            return cache_from_kv_layers(rows[0].past)  # common single-sequence case: no copy
        ref = next(r.past for r in rows if r.past is not None)
        layers = []
        for li, (k0, v0) in enumerate(ref):
            k = k0.new_zeros((len(rows), k0.shape[1], p, k0.shape[3]))
            v = v0.new_zeros((len(rows), v0.shape[1], p, v0.shape[3]))
            for bi, r in enumerate(rows):
                if r.past is not None and r.cached_len > 0:
                    rk, rv = r.past[li]
                    k[bi, :, p - r.cached_len :, :] = rk[0]
                    v[bi, :, p - r.cached_len :, :] = rv[0]
            layers.append((k, v))
        return cache_from_kv_layers(tuple(layers))

    def _forward_group(self, rows: Sequence[_Row]) -> list[tuple[torch.Tensor, KVLayers | None]]:
        b = len(rows)
        p = max(r.cached_len for r in rows)
        new_lens = [r.new_len for r in rows]
        l_max = max(new_lens)
        input_ids = np.full((b, l_max), self._pad_id, dtype=np.int64)
        position_ids = np.zeros((b, l_max), dtype=np.int64)
        mask = np.zeros((b, p + l_max), dtype=np.int64)
        for i, (r, n_new) in enumerate(zip(rows, new_lens)):
            c = r.cached_len
            input_ids[i, :n_new] = r.tokens[c:]
            position_ids[i, :n_new] = np.arange(c, c + n_new)
            mask[i, p - c : p + n_new] = 1
        # Logits only where some row needs them: new-segment positions [lo, l_max).
        lo = min(n_new - r.num_logits for r, n_new in zip(rows, new_lens))
        dev = self.device
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(dev),
            "attention_mask": torch.from_numpy(mask).to(dev),
            "position_ids": torch.from_numpy(position_ids).to(dev),
            "use_cache": self.kv_reuse,
        }
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = l_max - lo
        if self.kv_reuse:
            kwargs[self._cache_kw] = self._batched_past(rows, p) if p > 0 else DynamicCache()
        out = self.model(**kwargs)
        logits = out.logits
        offset = lo if self._has_logits_to_keep else 0
        picked = torch.cat(
            [logits[i, n - r.num_logits - offset : n - offset] for i, (r, n) in enumerate(zip(rows, new_lens))]
        )
        # Normalize in float32 whatever the model dtype: merged logprobs are compared across pools.
        lp = torch.log_softmax(picked.float(), dim=-1)

        kv: list[KVLayers | None] = [None] * b
        if self.kv_reuse:
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            layers = kv_layers_from_cache(cache)
            for i, (r, n_new) in enumerate(zip(rows, new_lens)):
                lo_i, hi_i = p - r.cached_len, p + n_new
                kv[i] = tuple((k[i : i + 1, :, lo_i:hi_i, :], v[i : i + 1, :, lo_i:hi_i, :]) for k, v in layers)

        with self._counters_lock:
            counters = self.counters
            counters.forward_passes += 1
            counters.rows += b
            counters.new_tokens += sum(new_lens)
            counters.padded_tokens += b * l_max
            counters.cached_tokens += sum(r.cached_len for r in rows)

        results: list[tuple[torch.Tensor, KVLayers | None]] = []
        start = 0
        for i, r in enumerate(rows):
            results.append((lp[start : start + r.num_logits], kv[i]))
            start += r.num_logits
        return results
