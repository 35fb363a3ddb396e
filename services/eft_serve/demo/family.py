"""The built-in demo model family: five tiny GPT-2 models sharing one tokenizer, built on first use.

Roles (one Hugging Face model directory each, loadable offline with ``AutoModelForCausalLM`` and
``AutoTokenizer``):

* ``small_base``  -- small model, pretrained only (the reference for the experts)
* ``small_ft``    -- small base fine-tuned in answer style A (expert A, the default fine-tune)
* ``small_ft_b``  -- small base fine-tuned in answer style B (expert B, a competing behaviour)
* ``large_base``  -- large model, pretrained only on the same text (knows many more facts)
* ``large_ft``    -- large base fine-tuned in style A (ground truth for evaluation only)

The family is built from a seed, deterministically (same seed, same machine type -> bit-identical
weights; ``fingerprint.json`` holds each model's weight sha256), in about 1.5 minutes on two CPU
cores, into a cache directory. Concurrent callers are serialised by a file lock; a build goes to a
temporary directory that is renamed into place after its completion marker is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eft_serve.demo import world as world_mod
from eft_serve.demo.world import World

# Bump when code (not the constants below, which `recipe_hash` covers) changes what a build makes.
FORMAT_VERSION = 1
ROLES: tuple[str, ...] = ("small_base", "small_ft", "small_ft_b", "large_base", "large_ft")
MARKER = "COMPLETE"
FINGERPRINT = "fingerprint.json"
BUILD_INFO = "build_info.json"


# ---- the recipe -------------------------------------------------------------------------------

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
LARGE_FINETUNE = FinetuneConfig(epochs=2, lr=1e-4)


def recipe() -> dict:
    """Everything (but code) that determines a build; its hash names the default cache dir."""
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": VOCAB_SIZE, "train_threads": TRAIN_THREADS, "block_size": BLOCK_SIZE,
        "n_positions": N_POSITIONS,
        "small": asdict(SMALL), "large": asdict(LARGE),
        "small_pretrain": asdict(SMALL_PRETRAIN), "large_pretrain": asdict(LARGE_PRETRAIN),
        "small_finetune": asdict(SMALL_FINETUNE), "large_finetune": asdict(LARGE_FINETUNE),
        "world": {
            "n_entities": world_mod.N_ENTITIES, "held_out_fraction": world_mod.HELD_OUT_FRACTION,
            "cjk_fraction": world_mod.CJK_FRACTION, "bios_per_entity": world_mod.BIOS_PER_ENTITY,
            "qa_per_fact": world_mod.QA_PER_FACT,
            "style_rates": [world_mod.STYLE_RATE_A, world_mod.STYLE_RATE_B],
            "values": world_mod.VALUES, "question": world_mod.QUESTION, "plain": world_mod.PLAIN_ANSWER,
            "prose": world_mod.PROSE, "smile": world_mod.SMILE,
        },
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoFamily:
    root: Path
    paths: dict[str, Path]
    seed: int
    world: World = field(repr=False)

    @property
    def tokenizer_path(self) -> Path:
        """Any model directory holds the (identical) shared tokenizer."""
        return self.paths["small_base"]

    def fingerprint(self) -> dict:
        return json.loads((self.root / FINGERPRINT).read_text())


def default_cache_dir(seed: int = 0) -> Path:
    """``$EFT_DEMO_DIR`` if set, else ``~/.cache/eft-serve/demo-v{FORMAT_VERSION}-{recipe hash[:8]}-seed{seed}``."""
    env = os.environ.get("EFT_DEMO_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "eft-serve" / f"demo-v{FORMAT_VERSION}-{recipe_hash()[:8]}-seed{seed}"


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the saved tensors (sorted names, dtype, shape, raw bytes)."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _marker(seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "recipe": recipe_hash(), "seed": seed}


def _family(root: Path, seed: int) -> DemoFamily:
    return DemoFamily(root=root, paths={r: root / r for r in ROLES}, seed=seed, world=World.from_seed(seed))


def _is_complete(root: Path, seed: int) -> bool:
    m = _read_marker(root)
    if m is None:
        return False
    want = _marker(seed)
    if m != want:
        raise ValueError(f"{root} holds a demo family built as {m}, not {want} (another seed, format "
                         f"version or training recipe); pass another cache dir or delete it")
    return all((root / r / "config.json").is_file() for r in ROLES)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_demo_family(cache_dir: Path | str | None = None, seed: int = 0, log: Log | None = None) -> DemoFamily:
    """The demo family for `seed`, built into `cache_dir` on first use (then reused).

    Default directory: `default_cache_dir` (``$EFT_DEMO_DIR``, else one per format version, recipe
    hash and seed under ``~/.cache/eft-serve``).
    Safe to call from several processes at once: one builds, the others wait for it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(seed)
    root = root.absolute()
    if _is_complete(root, seed):
        return _family(root, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if _is_complete(root, seed):
            return _family(root, seed)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(f"{root} exists, is not empty and holds no complete demo family")
        # Leftovers of builds that died (we hold the lock, so no build of this root is running).
        for stale in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            build_family(tmp, seed=seed, log=log)
            _make_readable(tmp)  # mkdtemp made it private
            if root.exists():
                root.rmdir()  # empty (checked above)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _family(root, seed)


def _make_readable(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def build_family(out: Path, seed: int = 0, log: Log | None = None) -> None:
    """Train all roles into `out` (an existing empty directory); the marker file is written last."""
    import torch

    from eft_serve.demo import train as T
    from eft_serve.demo.tokenizer import train_tokenizer

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    out = Path(out)
    world = World.from_seed(seed)
    tok = train_tokenizer(world, vocab_size=VOCAB_SIZE)
    say(f"tokenizer: vocab {len(tok)}; world: {len(world.entities)} entities, "
        f"{len(world.held_out_entities())} held out")

    stats: dict[str, T.TrainStats] = {}
    models: dict[str, torch.nn.Module] = {}
    models["small_base"], stats["small_base"] = T.pretrain(
        world, tok, SMALL, SMALL_PRETRAIN, seed=seed * 100 + 1, log=log, tag="small_base")
    models["large_base"], stats["large_base"] = T.pretrain(
        world, tok, LARGE, LARGE_PRETRAIN, seed=seed * 100 + 2, log=log, tag="large_base")
    models["small_ft"], stats["small_ft"] = T.finetune(
        models["small_base"], world, tok, "a", SMALL_FINETUNE, seed=seed * 100 + 3, log=log, tag="small_ft")
    models["small_ft_b"], stats["small_ft_b"] = T.finetune(
        models["small_base"], world, tok, "b", SMALL_FINETUNE, seed=seed * 100 + 4, log=log, tag="small_ft_b")
    models["large_ft"], stats["large_ft"] = T.finetune(
        models["large_base"], world, tok, "a", LARGE_FINETUNE, seed=seed * 100 + 5, log=log, tag="large_ft")

    fingerprint: dict = {**_marker(seed), "roles": {}}
    info: dict = {**_marker(seed), "torch": torch.__version__, "recipe_detail": recipe(), "roles": {}}
    for role in ROLES:
        d = out / role
        models[role].save_pretrained(str(d))
        tok.save_pretrained(str(d))
        cfg = models[role].config
        fingerprint["roles"][role] = {"sha256": weights_sha256(d)}
        info["roles"][role] = {
            "train_seconds": round(stats[role].seconds, 2),
            "final_loss": round(stats[role].final_loss, 4),
            "steps": stats[role].steps,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_params": sum(p.numel() for p in models[role].parameters()),
        }
    fingerprint["tokenizer_sha256"] = hashlib.sha256(
        (out / "small_base" / "tokenizer.json").read_bytes()).hexdigest()
    info["build_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2) + "\n")
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out / MARKER).write_text(json.dumps(_marker(seed)) + "\n")
    say(f"demo family built in {info['build_seconds']:.1f}s")


def demo_model_path(role: str, seed: int = 0, log: Log | None = None) -> Path:
    """Model directory of one role (builds the family on first use)."""
    if role not in ROLES:
        raise KeyError(f"unknown demo role {role!r}; roles: {', '.join(ROLES)}")
    return ensure_demo_family(seed=seed, log=log).paths[role]
