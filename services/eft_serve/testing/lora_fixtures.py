"""Random-weight PEFT LoRA adapters over a local base model, for tests and benchmarks.

Owns building an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, the
base named by its path) whose ``lora_B`` is random and non-zero, so the adapter really changes the
model, and the reference: the base with the adapter merged (``merge_and_unload``) saved as a plain
model directory. Knows nothing of the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = ["make_lora_adapter", "merged_model_dir"]


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    rank: int = 8,
    target_modules: Sequence[str] | None = None,
    std: float = 0.05,
) -> Path:
    """Save a LoRA adapter over ``base_dir`` into ``out_dir`` (random ``lora_A`` and ``lora_B``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        # GPT-2's projections are Conv1D (weights stored transposed).
        fan_in_fan_out=model.config.model_type == "gpt2",
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(target_modules) if target_modules else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts lora_B at zero (a no-op adapter): make it matter
                p.normal_(0.0, std)
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def merged_model_dir(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The base with the adapter merged in, saved (with the base's tokenizer) as a model directory."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return Path(out_dir)
