"""Chat prompts (issue 12 item 2): rendering per model (own template, plain transcript, template
string), their validation errors, the recipe's `prompt_format`, the validator's per-role prompt
ids, the gRPC message mapping and the CLI's `--chat` / `--message` flags."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eft_serve.config import CoordinatorConfig, PromptTemplate, RecipeConfig
from eft_serve.coordinator.request import ChatMessage, GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.coordinator.validate import ModelLimits, RequestValidator
from eft_serve.core.chat_format import plain_transcript, render_chat, render_template
from eft_serve.demo.world import CHAT_TEMPLATE, QA_TEMPLATE
from eft_serve.errors import InvalidArgument, Status
from eft_serve.proto_gen.eft.v1 import eft_pb2
from eft_serve.transport.client_messages import generation_request_from_proto
from eft_serve_client.cli import add_request_flags, chat_messages, request_prompt
from eft_serve_client.client import build_generate_request

EOS = "<|endoftext|>"
CHAT = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hi there"),
    ChatMessage("assistant", "Hello."),
    ChatMessage("user", "What is the river of Vorlék?"),
)
BRACKETS = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (one special token, EOS), like the demo family's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["What is the river of Vorlék? Hello. Hi there User: Assistant:"] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# ---- rendering ---------------------------------------------------------------------------------


def test_plain_transcript_is_one_line_per_message_then_the_generation_prompt() -> None:
    assert plain_transcript(CHAT) == (
        "System: Be brief.\nUser: Hi there\nAssistant: Hello.\nUser: What is the river of Vorlék?\nAssistant:"
    )


def test_plain_is_encoded_like_the_same_text_sent_as_a_prompt() -> None:
    tok = byte_tokenizer()
    assert render_chat(CHAT, "plain", tok) == tok.encode(plain_transcript(CHAT))


def test_own_uses_the_models_chat_template() -> None:
    tok = byte_tokenizer(CHAT_TEMPLATE)
    ids = render_chat(CHAT[1:2], "own", tok)
    assert tok.decode(ids) == "[INST] Hi there [/INST]"
    # The whole conversation: the assistant turn closes with EOS, as the template says.
    full = tok.decode(render_chat(CHAT, "own", tok))
    assert (
        full
        == f"<<SYS>> Be brief. <</SYS>> [INST] Hi there [/INST] Hello.{EOS}[INST] What is the river of Vorlék? [/INST]"
    )
    assert ids != render_chat(CHAT[1:2], "plain", tok)


def test_own_without_a_template_falls_back_to_plain() -> None:
    tok = byte_tokenizer()
    assert render_chat(CHAT, "own", tok) == render_chat(CHAT, "plain", tok)


def test_control_tokens_typed_in_a_message_stay_text() -> None:
    tok = byte_tokenizer(CHAT_TEMPLATE)
    ids = render_chat([ChatMessage("user", f"a{EOS}b")], "own", tok)
    assert tok.eos_token_id not in ids  # the typed "<|endoftext|>" is bytes, not the real EOS
    # In an assistant turn the template's own EOS is real.
    ids = render_chat([ChatMessage("user", "a"), ChatMessage("assistant", "b")], "own", tok)
    assert ids.count(tok.eos_token_id) == 1


def test_template_string_gets_messages_generation_prompt_and_special_tokens() -> None:
    tok = byte_tokenizer()
    text = render_template(BRACKETS + "{{ eos_token }}", CHAT[1:2], tok)
    assert text == f"<user>Hi there<a>{EOS}"
    ids = render_chat(CHAT[1:2], "template", tok, BRACKETS + "{{ eos_token }}")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1  # no extra specials added
    assert render_template(QA_TEMPLATE, CHAT, tok) == "Q: Hi there\nA: Hello.\nQ: What is the river of Vorlék?\nA:"


def test_template_errors_are_value_errors_naming_the_problem() -> None:
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="does not compile"):
        render_chat(CHAT, "template", tok, "{% for m in messages %}")
    rejecting = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(ValueError, match="first message must be user"):
        render_chat(CHAT, "template", tok, rejecting)
    with pytest.raises(ValueError, match="rejected the messages"):
        render_chat(CHAT, "own", byte_tokenizer(rejecting))
    with pytest.raises(ValueError, match="template string"):
        render_chat(CHAT, "template", tok)


# ---- config ------------------------------------------------------------------------------------


def test_prompt_format_config_is_validated() -> None:
    r = RecipeConfig(
        base="large_base",
        experts=["small_ft"],
        reference="small_base",
        prompt_format={"large_base": "plain", "small_base": {"template": QA_TEMPLATE}},
    )
    assert r.prompt_format["large_base"] == "plain"
    assert isinstance(r.prompt_format["small_base"], PromptTemplate)
    assert RecipeConfig(base="a").prompt_format == {}  # default: "own" for every role
    with pytest.raises(ValidationError, match="outside the recipe"):
        RecipeConfig(base="a", prompt_format={"b": "own"})
    with pytest.raises(ValidationError, match="does not compile"):
        RecipeConfig(base="a", prompt_format={"a": {"template": "{% if %}"}})
    with pytest.raises(ValidationError):
        RecipeConfig(base="a", prompt_format={"a": "chat"})
    with pytest.raises(ValidationError):
        RecipeConfig(base="a", prompt_format={"a": {"template": "x", "extra": 1}})


# ---- the validator -----------------------------------------------------------------------------

RECIPES = {
    "upscale": RecipeConfig(base="large_base", experts=["small_ft"], reference="small_base"),
    "mixed": RecipeConfig(
        base="large_base",
        experts=["small_ft"],
        reference="small_base",
        prompt_format={"large_base": {"template": QA_TEMPLATE}, "small_base": "plain"},
    ),
}


def chat_validator(max_context: int = 256, **cfg: object) -> tuple[RequestValidator, PreTrainedTokenizerFast]:
    base_tok = byte_tokenizer()
    tokenizers = {"large_base": base_tok, "small_base": byte_tokenizer(), "small_ft": byte_tokenizer(CHAT_TEMPLATE)}
    v = RequestValidator(
        RECIPES,
        CoordinatorConfig(default_recipe="upscale", max_new_tokens_cap=64, default_max_new_tokens=8, **cfg),
        base_tok,
        ModelLimits(vocab_size=len(base_tok), max_context=max_context),
        tokenizers,
    )
    return v, base_tok


def test_each_role_gets_its_own_prompt_ids() -> None:
    v, tok = chat_validator()
    msgs = (ChatMessage("user", "What is the river of Vorlék?"),)
    plan = v.generation(GenerationRequest(prompt="", messages=msgs))
    assert tok.decode(plan.prompt_ids) == "User: What is the river of Vorlék?\nAssistant:"  # base: no template
    assert tok.decode(plan.prompt_of("small_ft")) == "[INST] What is the river of Vorlék? [/INST]"
    assert plan.prompt_of("small_base") == plan.prompt_ids
    assert set(plan.role_prompt_ids) == {"small_ft"}  # only roles that differ from the base
    plan = v.generation(GenerationRequest(prompt="", messages=msgs, merge=MergeOptions(recipe="mixed")))
    assert tok.decode(plan.prompt_ids) == "Q: What is the river of Vorlék?\nA:"
    assert tok.decode(plan.prompt_of("small_base")) == "User: What is the river of Vorlék?\nAssistant:"
    assert tok.decode(plan.prompt_of("small_ft")) == "[INST] What is the river of Vorlék? [/INST]"


def test_plain_prompts_are_unchanged() -> None:
    v, tok = chat_validator()
    plan = v.generation(GenerationRequest(prompt="Q: hi\nA:"))
    assert plan.role_prompt_ids == {} and plan.prompt_ids == tok.encode("Q: hi\nA:")
    assert all(plan.prompt_of(r) == plan.prompt_ids for r in ("large_base", "small_ft", "small_base"))


def test_a_drafter_outside_the_recipe_gets_its_own_prompt() -> None:
    v, tok = chat_validator(speculative={"drafter": "small_ft"})
    msgs = (ChatMessage("user", "Hi there"),)
    plan = v.generation(
        GenerationRequest(
            prompt="", messages=msgs, merge=MergeOptions(recipe="mixed"), speculative=SpeculativeOptions(enabled=True)
        )
    )
    assert plan.speculation is not None and plan.speculation.drafter == "small_ft"
    assert tok.decode(plan.prompt_of("small_ft")) == "[INST] Hi there [/INST]"


@pytest.mark.parametrize(
    "req, match",
    [
        (GenerationRequest(prompt="hi", messages=(ChatMessage("user", "x"),)), "either prompt or messages"),
        (GenerationRequest(prompt="", messages=(ChatMessage("robot", "x"),)), r"messages\[0\].role is 'robot'"),
        (
            GenerationRequest(prompt="", messages=(ChatMessage("user", "x"), ChatMessage("User", "y"))),
            r"messages\[1\].role",
        ),
        (GenerationRequest(prompt=""), "prompt is empty"),
    ],
)
def test_bad_chat_requests_are_invalid_argument(req: GenerationRequest, match: str) -> None:
    v, _ = chat_validator()
    with pytest.raises(InvalidArgument, match=match) as err:
        v.generation(req)
    assert err.value.status is Status.INVALID_ARGUMENT


def test_messages_are_held_to_the_prompt_byte_cap() -> None:
    v, _ = chat_validator(max_context=4096, max_prompt_bytes=1000)
    v.generation(GenerationRequest(prompt="", messages=(ChatMessage("user", "x" * 900),)))
    with pytest.raises(InvalidArgument, match="over this server's limit of 1000"):
        v.generation(GenerationRequest(prompt="", messages=(ChatMessage("user", "x" * 500),) * 2))
    with pytest.raises(InvalidArgument, match="over this server's limit"):
        v.generation(GenerationRequest(prompt="", messages=(ChatMessage("user", ""),) * 100))


def test_a_template_that_rejects_the_messages_is_invalid_argument_naming_the_model() -> None:
    v, _ = chat_validator()
    strict = "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('the last message must be a user turn') }}{% endif %}"
    v._tokenizers["small_ft"] = byte_tokenizer(strict)
    with pytest.raises(InvalidArgument, match="'small_ft'.*last message must be a user turn"):
        v.generation(GenerationRequest(prompt="", messages=(ChatMessage("assistant", "x"),)))


def test_context_limit_counts_the_longest_role_prompt() -> None:
    v, tok = chat_validator()
    msgs = (ChatMessage("user", "Hi there"),)
    plan = v.generation(GenerationRequest(prompt="", messages=msgs))
    lengths = sorted({len(plan.prompt_of(r)) for r in ("large_base", "small_ft", "small_base")})
    assert len(lengths) == 2
    # A context that fits the shorter prompt but not the longer one is refused, naming the longer.
    v2, _ = chat_validator(max_context=lengths[-1])
    with pytest.raises(InvalidArgument, match=f"prompt is {lengths[-1]} tokens"):
        v2.generation(GenerationRequest(prompt="", messages=msgs))


# ---- wire and CLI ------------------------------------------------------------------------------


def test_messages_map_from_the_wire() -> None:
    req = eft_pb2.GenerateRequest(
        messages=[eft_pb2.ChatMessage(role="system", content="s"), eft_pb2.ChatMessage(role="user", content="u")]
    )
    got = generation_request_from_proto(req)
    assert got.prompt == "" and got.messages == (ChatMessage("system", "s"), ChatMessage("user", "u"))
    # The slim client builds the same wire message from dicts or pairs.
    built = build_generate_request(messages=[{"role": "system", "content": "s"}, ("user", "u")])
    assert eft_pb2.GenerateRequest.FromString(built.SerializeToString()).messages == req.messages
    assert built.prompt == ""


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("prompt", nargs="?", default="")
    add_request_flags(p)
    return p.parse_args(list(argv))


def test_cli_chat_flags() -> None:
    a = _args("What is the river of Vorlék?", "--chat")
    assert chat_messages(a) == [("user", "What is the river of Vorlék?")] and request_prompt(a) == ""
    a = _args("--message", "system=Be brief.", "--message", "user=Hi=there")
    assert chat_messages(a) == [("system", "Be brief."), ("user", "Hi=there")] and request_prompt(a) == ""
    a = _args("Q: hi\nA:")
    assert chat_messages(a) == [] and request_prompt(a) == "Q: hi\nA:"
    with pytest.raises(SystemExit, match="ROLE=TEXT"):
        chat_messages(_args("--message", "nonsense"))


# ---- the demo family's chat add-on (with a fake, fast build) -----------------------------------


def test_chat_add_on_is_added_to_an_existing_family_and_skipped_when_it_cannot_be(tmp_path, monkeypatch) -> None:
    import json

    from eft_serve.demo import family as fam_mod

    def fake_core_build(out, seed=0, log=None) -> None:  # an older family: no chat expert
        for role in fam_mod.CORE_ROLES:
            (out / role).mkdir()
            (out / role / "config.json").write_text("{}")
        (out / fam_mod.MARKER).write_text(json.dumps(fam_mod._marker(seed)))

    def fake_add(root, seed, log) -> None:
        (root / fam_mod.CHAT_ROLE).mkdir()
        (root / fam_mod.CHAT_ROLE / fam_mod.CHAT_MARKER).write_text(json.dumps(fam_mod._chat_marker(seed)))
        added.append(root)

    added: list = []
    monkeypatch.setattr(fam_mod, "build_family", fake_core_build)
    monkeypatch.setattr(fam_mod, "_add_chat_expert", fake_add)
    fam = fam_mod.ensure_demo_family(tmp_path / "old", seed=0)
    assert set(fam.paths) == set(fam_mod.ROLES) and added == [tmp_path / "old"]
    fam_mod.ensure_demo_family(tmp_path / "old", seed=0)
    assert len(added) == 1  # complete: not made again

    # Where the add-on cannot be written (a read-only image), the other roles are still served.
    def read_only(root, seed, log) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(fam_mod, "_add_chat_expert", read_only)
    logged: list[str] = []
    fam = fam_mod.ensure_demo_family(tmp_path / "ro", seed=0, log=logged.append)
    assert set(fam.paths) == set(fam_mod.CORE_ROLES) and "read-only" in logged[-1]


def test_demo_chat_deploy_file_is_the_chat_demo_config() -> None:
    from pathlib import Path

    from eft_serve.config import demo_config, load_config

    root = Path(__file__).resolve().parents[2]
    assert load_config(root / "deploy" / "demo_chat.yaml") == demo_config(with_chat=True)
    assert "small_chat" not in demo_config().pools and "small_chat" not in demo_config(full_family=True).pools
    # It renders to a Serve config that passes the same checks as the default one.
    from eft_serve.serve.app import serve_config
    from eft_serve.serve.config_check import check_serve_config

    assert check_serve_config(serve_config(demo_config(with_chat=True))) == []
