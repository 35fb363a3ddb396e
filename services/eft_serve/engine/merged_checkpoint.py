"""A LoRA fine-tune as a plain checkpoint on disk, for engines that load directories (vLLM).

Owns writing base + adapter, merged once (`engine.lora.merge_adapter`), into a private directory
with the base's tokenizer, and that directory's lifetime (removed when the process exits). The
pool then serves it as any model, under the adapter's own weights fingerprint, so result-cache
keys are the same as when the HF engine merges in memory. Does NOT know pools or configs, and is
not how co-located adapters are served (those stay beside their base, `LoraSet`).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from eft_serve.engine.fingerprint import model_fingerprint
from eft_serve.engine.lora import adapter_fingerprint, merge_adapter

__all__ = ["write_merged_checkpoint"]


def write_merged_checkpoint(
    base_dir: str | Path, adapter_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[Path, str]:
    """(directory holding base + adapter merged, its weights fingerprint). Loads on CPU: the
    merge is elementwise, and the engine moves the result where it runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    merged = merge_adapter(base, adapter_dir)
    out = Path(tempfile.mkdtemp(prefix="eft-merged-lora-"))
    atexit.register(shutil.rmtree, out, True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code).save_pretrained(out)
    return out, adapter_fingerprint(model_fingerprint(Path(base_dir)), adapter_dir)
