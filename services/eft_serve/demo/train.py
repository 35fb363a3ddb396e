"""Training and evaluation of the demo family's tiny GPT-2 models (CPU, seeded, deterministic).

Owns how one model is made and measured: a fresh GPT-2 of a given size, pretraining on the
world's text, fine-tuning in one answer style, greedy decoding of a weighted combination of
models, and fact accuracy / style rates on held-out questions.

Does NOT know the family (which roles exist, the cache, the build order: `eft_serve.demo.family`)
or the service. ``python -m eft_serve.demo`` builds the family and reports on it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from eft_serve.demo.build_spec import BLOCK_SIZE, N_POSITIONS, TRAIN_THREADS, FinetuneConfig, ModelSpec, PretrainConfig
from eft_serve.demo.world import EOS, STYLES, Question, Style, World, style_of


@dataclass
class TrainStats:
    seconds: float
    final_loss: float
    steps: int


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def new_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> GPT2LMHeadModel:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_layer=spec.n_layer,
        n_embd=spec.n_embd,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def _lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )


def pack_documents(
    tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents (each followed by EOS) into blocks, first fit; pad with EOS, label -100.

    No document is split, so each block starts at a document start (as a served prompt does).
    """
    eos = tokenizer.convert_tokens_to_ids(EOS)
    blocks: list[list[int]] = []
    open_blocks: list[int] = []  # indices of blocks with room left, in creation order (first fit)
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids = ids[: block_size - 1] + [eos]
        for j, b in enumerate(open_blocks):
            if len(blocks[b]) + len(ids) <= block_size:
                blocks[b] += ids
                if block_size - len(blocks[b]) < 16:
                    del open_blocks[j]
                break
        else:
            blocks.append(list(ids))
            open_blocks.append(len(blocks) - 1)
    inputs = torch.full((len(blocks), block_size), eos, dtype=torch.long)
    labels = torch.full((len(blocks), block_size), -100, dtype=torch.long)
    for i, b in enumerate(blocks):
        inputs[i, : len(b)] = torch.tensor(b)
        labels[i, : len(b)] = torch.tensor(b)
    return inputs, labels


def _train_steps(
    model: GPT2LMHeadModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    warmup: int,
    min_ratio: float,
    weight_decay: float,
    log: Callable[[str], None] | None,
    tag: str,
) -> TrainStats:
    t0 = time.perf_counter()
    opt = _optimizer(model, lr, weight_decay)
    model.train()
    total = len(batches)
    ema = None
    for step, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, lr, warmup, min_ratio)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = loss.item()
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        if log and (step % 100 == 0 or step == total - 1):
            log(f"[{tag}] step {step + 1}/{total} loss {v:.3f} (ema {ema:.3f}) {time.perf_counter() - t0:.1f}s")
    model.eval()
    return TrainStats(seconds=time.perf_counter() - t0, final_loss=float(ema or 0.0), steps=total)


def pretrain(
    world: World,
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    cfg: PretrainConfig,
    seed: int,
    log: Callable[[str], None] | None = None,
    tag: str = "pretrain",
) -> tuple[GPT2LMHeadModel, TrainStats]:
    """A fresh model (initialised from `seed`) trained on the world's pretraining text."""
    with torch_threads(TRAIN_THREADS), torch.random.fork_rng(devices=[]):
        model = new_model(spec, tokenizer, seed)
        batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for epoch in range(cfg.epochs):
            x, y = pack_documents(tokenizer, world.pretraining_docs(epoch))
            rng = random.Random(f"eft-demo-blocks/{world.seed}/{epoch}")  # same data order for every model
            order = list(range(len(x)))
            rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                idx = torch.tensor(order[i : i + cfg.batch_size])
                batches.append((x[idx], y[idx]))
        stats = _train_steps(model, batches, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.weight_decay, log, tag)
    return model, stats


def _finetune_batches(
    world: World, tokenizer: PreTrainedTokenizerBase, style: Style, cfg: FinetuneConfig, chat: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for epoch in range(cfg.epochs):
        ex = world.finetune_examples(style, epoch, chat=chat)
        for i in range(0, len(ex), cfg.batch_size):
            chunk = ex[i : i + cfg.batch_size]
            rows: list[tuple[list[int], int]] = []
            for prompt, answer in chunk:
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [eos]
                assert full[: len(p)] == p, "prompt tokens must be a prefix of the example's tokens"
                rows.append((full, len(p)))
            width = max(len(f) for f, _ in rows)
            x = torch.full((len(rows), width), eos, dtype=torch.long)
            y = torch.full((len(rows), width), -100, dtype=torch.long)
            for r, (full, n_prompt) in enumerate(rows):
                x[r, : len(full)] = torch.tensor(full)
                y[r, n_prompt : len(full)] = torch.tensor(full[n_prompt:])  # loss on the answer only
            batches.append((x, y))
    return batches


def finetune(
    base: GPT2LMHeadModel,
    world: World,
    tokenizer: PreTrainedTokenizerBase,
    style: Style,
    cfg: FinetuneConfig,
    seed: int,
    log: Callable[[str], None] | None = None,
    tag: str = "finetune",
    chat: bool = False,
) -> tuple[GPT2LMHeadModel, TrainStats]:
    """A copy of `base` fine-tuned on style-`style` answers about the train entities only
    (`chat`: to questions in the chat expert's format, `world.chat_prompt_for`)."""
    with torch_threads(TRAIN_THREADS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        batches = _finetune_batches(world, tokenizer, style, cfg, chat=chat)
        stats = _train_steps(model, batches, cfg.lr, cfg.warmup_steps, 1.0, 0.0, log, tag)
    return model, stats


# ---- evaluation ------------------------------------------------------------------------------

Combo = Sequence[tuple[torch.nn.Module, float]]


def _forward_cached(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> Any:
    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is deprecated).
    if "cache" in inspect.signature(model.forward).parameters:
        return model(input_ids=input_ids, cache=cache, use_cache=True)
    return model(input_ids=input_ids, past_key_values=cache, use_cache=True)


def _cache_of(output: Any) -> Any:
    c = getattr(output, "cache", None)
    return c if c is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def greedy_generate(
    combo: Combo,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations under score = Σ w_i · log p_i (one model with weight 1 = plain greedy).

    Prompts are batched by token length, so no padding is needed. Stops at EOS.
    """
    eos = tokenizer.convert_tokens_to_ids(EOS)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    for length in sorted(by_len):
        members = by_len[length]
        for s in range(0, len(members), batch_size):
            idx = members[s : s + batch_size]
            x = torch.tensor([encoded[i] for i in idx])
            caches: list[Any] = [None] * len(combo)
            gen = torch.empty((len(idx), 0), dtype=torch.long)
            done = torch.zeros(len(idx), dtype=torch.bool)
            step_in = x
            for _ in range(max_new_tokens):
                score = None
                for k, (m, w) in enumerate(combo):
                    o = _forward_cached(m, step_in, caches[k])
                    caches[k] = _cache_of(o)
                    lp = torch.log_softmax(o.logits[:, -1, :].float(), dim=-1) * w
                    score = lp if score is None else score + lp
                nxt = score.argmax(dim=-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                gen = torch.cat([gen, nxt[:, None]], dim=1)
                done |= nxt == eos
                if bool(done.all()):
                    break
                step_in = nxt[:, None]
            for r, i in enumerate(idx):
                ids = gen[r].tolist()
                if eos in ids:
                    ids = ids[: ids.index(eos)]
                out[i] = tokenizer.decode(ids)
    return out


def evaluate(
    combo: Combo, tokenizer: PreTrainedTokenizerBase, world: World, questions: Sequence[Question] | None = None
) -> dict[str, float]:
    """Fact accuracy and style rates of greedy answers (held-out questions by default)."""
    qs = list(world.held_out_questions() if questions is None else questions)
    texts = greedy_generate(combo, tokenizer, [q.prompt for q in qs])
    res: dict[str, float] = {"accuracy": sum(world.is_correct(q, t) for q, t in zip(qs, texts)) / len(qs)}
    for s in STYLES:
        res[f"style_{s}"] = sum(style_of(t) == s for t in texts) / len(qs)
    return res
