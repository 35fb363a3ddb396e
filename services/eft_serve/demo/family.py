"""The built-in demo model family: six tiny GPT-2 models sharing one tokenizer, built on first use.

Roles (one Hugging Face model directory each, loadable offline with ``AutoModelForCausalLM`` and
``AutoTokenizer``):

* ``small_base``  -- small model, pretrained only (the reference for the experts)
* ``small_ft``    -- small base fine-tuned in answer style A (expert A, the default fine-tune)
* ``small_ft_b``  -- small base fine-tuned in answer style B (expert B, a competing behaviour)
* ``large_base``  -- large model, pretrained only on the same text (knows many more facts)
* ``large_ft``    -- large base fine-tuned in style A (ground truth for evaluation only)
* ``small_chat``  -- small base fine-tuned in style A on questions in a chat format; its tokenizer
  carries that format as its ``chat_template`` (`world.CHAT_TEMPLATE`), so chat requests reach it
  in the format it was tuned on (recipe ``upscale_chat`` in the full-family config)

``small_chat`` is an add-on: made from the finished ``small_base`` in about a second, with its own
spec hash and completion marker (`CHAT_MARKER` in its directory), so adding it changed neither the
family's build spec hash nor any other role's weights. A fresh build makes it with the rest; a
family built before it existed gets it added in place on first use.

The family is built from a seed, deterministically (same seed, same machine type -> bit-identical
weights; ``fingerprint.json`` holds each model's weight sha256), in about 1.5 minutes on two CPU
cores, into a cache directory. Concurrent callers are serialised by a file lock; a build goes to a
temporary directory that is renamed into place after its completion marker is written.

Owns the cache: where a family lives (`default_cache_dir`), the completion marker, the lock, and
the build of all roles in order (`build_family`, which drives `eft_serve.demo.train`).
Does NOT know the service that serves the family: nothing here imports the stack, Ray, gRPC or
the client. The build spec (sizes, steps, data mix) is `eft_serve.demo.build_spec`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eft_serve.demo.build_spec import BUILD_SPEC, CHAT_FINETUNE, FORMAT_VERSION, build_spec_hash, chat_spec_hash
from eft_serve.demo.world import CHAT_TEMPLATE, World

# The roles the build spec hash covers (and `fingerprint.json` lists), then the chat add-on.
CORE_ROLES: tuple[str, ...] = ("small_base", "small_ft", "small_ft_b", "large_base", "large_ft")
CHAT_ROLE = "small_chat"
ROLES: tuple[str, ...] = (*CORE_ROLES, CHAT_ROLE)
MARKER = "COMPLETE"
CHAT_MARKER = "CHAT_COMPLETE"
FINGERPRINT = "fingerprint.json"
BUILD_INFO = "build_info.json"

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

    def fingerprint(self) -> dict[str, Any]:
        """`fingerprint.json`, with the chat add-on's weight sha256 (from its marker) among the roles."""
        data: dict[str, Any] = json.loads((self.root / FINGERPRINT).read_text())
        chat = _read_marker(self.root / CHAT_ROLE, CHAT_MARKER)
        if chat is not None:
            data["roles"][CHAT_ROLE] = {"sha256": chat["sha256"]}
        return data


def default_cache_dir(seed: int = 0) -> Path:
    """``$EFT_DEMO_DIR`` if set, else ``~/.cache/eft-serve/demo-v{FORMAT_VERSION}-{build spec hash[:8]}-seed{seed}``."""
    env = os.environ.get("EFT_DEMO_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "eft-serve" / f"demo-v{FORMAT_VERSION}-{build_spec_hash()[:8]}-seed{seed}"


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


def _read_marker(root: Path, name: str = MARKER) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / name).read_text())
        return data
    except (OSError, ValueError):
        return None


def _marker(seed: int) -> dict[str, Any]:
    # "recipe" is the on-disk (format v1) key of the build spec hash; renaming it would make every
    # existing family look foreign to `_is_complete`.
    return {"format_version": FORMAT_VERSION, "recipe": build_spec_hash(), "seed": seed}


def _family(root: Path, seed: int) -> DemoFamily:
    roles = ROLES if _chat_is_complete(root, seed) else CORE_ROLES
    return DemoFamily(root=root, paths={r: root / r for r in roles}, seed=seed, world=World.from_seed(seed))


def _is_complete(root: Path, seed: int) -> bool:
    m = _read_marker(root)
    if m is None:
        return False
    want = _marker(seed)
    if m != want:
        raise ValueError(
            f"{root} holds a demo family built as {m}, not {want} (another seed, format "
            f"version or build spec); pass another cache dir or delete it"
        )
    return all((root / r / "config.json").is_file() for r in CORE_ROLES)


def _chat_marker(seed: int) -> dict[str, Any]:
    return {"chat_spec": chat_spec_hash(), "seed": seed}


def _chat_is_complete(root: Path, seed: int) -> bool:
    m = _read_marker(root / CHAT_ROLE, CHAT_MARKER)
    return m is not None and {k: m.get(k) for k in ("chat_spec", "seed")} == _chat_marker(seed)


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

    Default directory: `default_cache_dir` (``$EFT_DEMO_DIR``, else one per format version, build
    spec hash and seed under ``~/.cache/eft-serve``).
    Safe to call from several processes at once: one builds, the others wait for it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(seed)
    root = root.absolute()
    _ensure_core(root, seed, log)
    if not _chat_is_complete(root, seed):
        try:
            with _locked(root.parent / f".{root.name}.lock"):
                if not _chat_is_complete(root, seed):
                    _add_chat_expert(root, seed, log)
        except OSError as e:
            # A read-only family (an image built before the add-on): serve the other roles.
            (log or (lambda _m: None))(f"cannot add the chat expert to {root}: {e}")
    return _family(root, seed)


def _ensure_core(root: Path, seed: int, log: Log | None) -> None:
    if _is_complete(root, seed):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if _is_complete(root, seed):
            return
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


def _add_chat_expert(root: Path, seed: int, log: Log | None) -> None:
    """Make the chat add-on of a complete family in place (the caller holds the family's lock)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    for stale in root.glob(f".{CHAT_ROLE}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHAT_ROLE}.tmp-", dir=root))
    try:
        small_base = GPT2LMHeadModel.from_pretrained(str(root / "small_base"))
        tok = AutoTokenizer.from_pretrained(str(root / "small_base"))
        _build_chat_expert(small_base, tok, World.from_seed(seed), seed, tmp, log)
        _make_readable(tmp)
        shutil.rmtree(root / CHAT_ROLE, ignore_errors=True)  # one of another chat spec
        os.rename(tmp, root / CHAT_ROLE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_chat_expert(small_base: Any, tok: Any, world: World, seed: int, out: Path, log: Log | None) -> None:
    """Fine-tune `small_base` into the chat expert and save it (tokenizer with the chat template) to `out`."""
    import copy

    from eft_serve.demo import train

    t0 = time.perf_counter()
    model, stats = train.finetune(
        small_base, world, tok, "a", CHAT_FINETUNE, seed=seed * 100 + 6, log=log, tag=CHAT_ROLE, chat=True
    )
    model.save_pretrained(str(out))
    chat_tok = copy.deepcopy(tok)  # the shared tokenizer object stays template-free
    chat_tok.chat_template = CHAT_TEMPLATE
    chat_tok.save_pretrained(str(out))
    marker = {
        **_chat_marker(seed),
        "sha256": weights_sha256(out),
        "train_seconds": round(stats.seconds, 2),
        "final_loss": round(stats.final_loss, 4),
    }
    # Written last: a directory without it is incomplete.
    (out / CHAT_MARKER).write_text(json.dumps(marker) + "\n")
    (log or (lambda _m: None))(f"chat expert built in {time.perf_counter() - t0:.1f}s")


def _make_readable(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def build_family(out: Path, seed: int = 0, log: Log | None = None) -> None:
    """Train all roles into `out` (an existing empty directory); the marker file is written last."""
    # Imported here, not at the top: they load torch and transformers, which finding an already
    # built family (the common case, in every replica) does not need.
    import torch
    from transformers import GPT2LMHeadModel

    from eft_serve.demo import train
    from eft_serve.demo.tokenizer import train_tokenizer

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    out = Path(out)
    world = World.from_seed(seed)
    spec = BUILD_SPEC
    tok = train_tokenizer(world, vocab_size=spec.vocab_size)
    say(
        f"tokenizer: vocab {len(tok)}; world: {len(world.entities)} entities, {len(world.held_out_entities())} held out"
    )

    stats: dict[str, train.TrainStats] = {}
    models: dict[str, GPT2LMHeadModel] = {}
    models["small_base"], stats["small_base"] = train.pretrain(
        world, tok, spec.small, spec.small_pretrain, seed=seed * 100 + 1, log=log, tag="small_base"
    )
    models["large_base"], stats["large_base"] = train.pretrain(
        world, tok, spec.large, spec.large_pretrain, seed=seed * 100 + 2, log=log, tag="large_base"
    )
    models["small_ft"], stats["small_ft"] = train.finetune(
        models["small_base"], world, tok, "a", spec.small_finetune, seed=seed * 100 + 3, log=log, tag="small_ft"
    )
    models["small_ft_b"], stats["small_ft_b"] = train.finetune(
        models["small_base"], world, tok, "b", spec.small_finetune, seed=seed * 100 + 4, log=log, tag="small_ft_b"
    )
    models["large_ft"], stats["large_ft"] = train.finetune(
        models["large_base"], world, tok, "a", spec.large_finetune, seed=seed * 100 + 5, log=log, tag="large_ft"
    )

    fingerprint: dict[str, Any] = {**_marker(seed), "roles": {}}
    # "recipe_detail" is the on-disk (format v1) key of the full build spec.
    info: dict[str, Any] = {**_marker(seed), "torch": torch.__version__, "recipe_detail": spec.as_dict(), "roles": {}}
    for role in CORE_ROLES:
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
    fingerprint["tokenizer_sha256"] = hashlib.sha256((out / "small_base" / "tokenizer.json").read_bytes()).hexdigest()
    info["build_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2) + "\n")
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out / MARKER).write_text(json.dumps(_marker(seed)) + "\n")
    say(f"demo family built in {info['build_seconds']:.1f}s")
    # The chat add-on, from the same small base (its RNG forked: nothing above changes).
    (out / CHAT_ROLE).mkdir()
    _build_chat_expert(models["small_base"], tok, world, seed, out / CHAT_ROLE, log)


def demo_model_path(role: str, seed: int = 0, log: Log | None = None) -> Path:
    """Model directory of one role (builds the family on first use)."""
    if role not in ROLES:
        raise KeyError(f"unknown demo role {role!r}; roles: {', '.join(ROLES)}")
    return ensure_demo_family(seed=seed, log=log).paths[role]
