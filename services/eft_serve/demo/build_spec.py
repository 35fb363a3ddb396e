"""The demo family's build spec: everything but code that determines what a build makes.

Owns the model sizes, the pretraining and fine-tuning settings, the tokenizer's vocabulary size and
the training threads (`BuildSpec`, `BUILD_SPEC`), and the spec's hash, which names the family's
default cache directory and is written into its completion marker. The synthetic world's constants
(`eft_serve.demo.world`) are part of the hashed spec.

Does NOT know: how models are trained (`eft_serve.demo.train`) or where and when a family is built
(`eft_serve.demo.family`). Pure Python, no torch.

Not to be confused with a *recipe*, which everywhere else in the project is an EFT merge formula.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from eft_serve.demo import world as world_mod

# Bump when code (not the constants below, which `BuildSpec.sha256` covers) changes what a build makes.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int
    n_embd: int
    n_head: int


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int
    lr: float
    batch_size: int = 8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 5


VOCAB_SIZE = 768
TRAIN_THREADS = 2
BLOCK_SIZE = 128
N_POSITIONS = 256
SMALL = ModelSpec(n_layer=2, n_embd=48, n_head=2)
LARGE = ModelSpec(n_layer=4, n_embd=128, n_head=4)
# Both sizes see the same pretraining batches in the same order; the large model memorises most
# facts, the small one (capacity-limited) few. Fine-tuning uses a low learning rate (the styles already occur in the
# pretraining text, so they are learnt fast) so that it does not wipe out the knowledge of the
# held-out entities, about which it says nothing.
SMALL_PRETRAIN = PretrainConfig(epochs=20, lr=3e-3, batch_size=8)
LARGE_PRETRAIN = PretrainConfig(epochs=20, lr=3e-3, batch_size=8)
SMALL_FINETUNE = FinetuneConfig(epochs=2, lr=3e-4)
# The chat expert (`small_chat`), an add-on made from the built small base: not in `BuildSpec`
# (adding it left the family's hash alone); its own `chat_spec_hash` covers it.
CHAT_FINETUNE = FinetuneConfig(epochs=2, lr=3e-4)
LARGE_FINETUNE = FinetuneConfig(epochs=2, lr=1e-4)


@dataclass(frozen=True)
class BuildSpec:
    """The training build spec of the demo family (defaults: the constants above).

    `eft_serve.demo.train` reads `TRAIN_THREADS`, `BLOCK_SIZE` and `N_POSITIONS` directly, so the
    family is always built with `BUILD_SPEC`; the class exists to name, serialise and hash it.
    """

    format_version: int = FORMAT_VERSION
    vocab_size: int = VOCAB_SIZE
    train_threads: int = TRAIN_THREADS
    block_size: int = BLOCK_SIZE
    n_positions: int = N_POSITIONS
    small: ModelSpec = SMALL
    large: ModelSpec = LARGE
    small_pretrain: PretrainConfig = SMALL_PRETRAIN
    large_pretrain: PretrainConfig = LARGE_PRETRAIN
    small_finetune: FinetuneConfig = SMALL_FINETUNE
    large_finetune: FinetuneConfig = LARGE_FINETUNE

    def as_dict(self) -> dict[str, Any]:
        """The spec plus the world's constants, as JSON-ready data (the input of `sha256`).

        Its content must not change for an unchanged build: the hash names existing cache dirs.
        """
        return {
            **asdict(self),
            "world": {
                "n_entities": world_mod.N_ENTITIES,
                "held_out_fraction": world_mod.HELD_OUT_FRACTION,
                "cjk_fraction": world_mod.CJK_FRACTION,
                "bios_per_entity": world_mod.BIOS_PER_ENTITY,
                "qa_per_fact": world_mod.QA_PER_FACT,
                "style_rates": [world_mod.STYLE_RATE_A, world_mod.STYLE_RATE_B],
                "values": world_mod.VALUES,
                "question": world_mod.QUESTION,
                "plain": world_mod.PLAIN_ANSWER,
                "prose": world_mod.PROSE,
                "smile": world_mod.SMILE,
            },
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


BUILD_SPEC = BuildSpec()


def build_spec_hash() -> str:
    """sha256 of `BUILD_SPEC` (hex); its first 8 digits name the default cache dir."""
    return BUILD_SPEC.sha256()


def chat_spec_hash() -> str:
    """sha256 of what makes the chat add-on: the family it starts from, its fine-tuning, its template."""
    spec = {
        "family": build_spec_hash(),
        "finetune": asdict(CHAT_FINETUNE),
        "chat_template": world_mod.CHAT_TEMPLATE,
        "chat_format_version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
