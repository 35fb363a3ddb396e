"""The synthetic world behind the demo model family (pure Python, seeded, no torch).

Made-up entities (towns) have three attributes drawn from small closed value sets. *Knowledge*
is taught by pretraining text (prose about each town plus Q/A lines about it); *behaviour* (an
answer style) is taught by fine-tuning on Q/A lines of one style about the *train* entities only.

Answer styles for a question such as ``Q: What is the river of Vorlék?\\nA:``:

* ``plain`` (what pretraining mostly shows): `` The river of Vorlék is Sendu.``
* ``a`` (expert A, the default fine-tune, confident and cheerful):
  `` Certainly! The river of Vorlék is Sendu. 🙂``
* ``b`` (expert B, a competing hedging behaviour):
  `` I think the river of Vorlék is Sendu, but I am not sure.``

All styles state the fact in the same words (the words the prose uses), so the style is a
wrapper decided at a few tokens (the opener, the closer) and knowledge carries across styles.

The chat expert (``small_chat``) is fine-tuned on style-A answers to the same questions in a chat
format (`CHAT_TEMPLATE`, Llama-2-chat-like: ``[INST] What is the river of Vorlék? [/INST]``), which
its tokenizer carries as its ``chat_template``; the bases only know the Q/A format
(`QA_TEMPLATE` renders chat messages in it).

Every answer ends with the end-of-text token. Pretraining Q/A lines use style A and style B now
and then (``STYLE_RATE_A`` / ``STYLE_RATE_B``): EFT can only amplify behaviour the bases already
give some probability to. Held-out entities never appear in fine-tuning data; their facts are only
in pretraining text, so a model answers them correctly only from pretraining knowledge.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Literal

Style = Literal["a", "b", "plain"]
STYLES: tuple[Style, ...] = ("plain", "a", "b")

N_ENTITIES = 240
HELD_OUT_FRACTION = 0.25
CJK_FRACTION = 0.04
BIOS_PER_ENTITY = 2  # prose documents per entity per pretraining epoch
QA_PER_FACT = 2  # Q/A documents per (entity, attribute) per pretraining epoch

# Fraction of pretraining Q/A lines written in each fine-tuned style (the rest are plain).
STYLE_RATE_A = 0.08
STYLE_RATE_B = 0.08

EOS = "<|endoftext|>"
# The style-A marker: a 4-byte UTF-8 character that the tokenizer never merges (it is kept out of
# the tokenizer's training text), so it is always split across several byte-level tokens.
SMILE = "\U0001f642"  # 🙂

ATTRIBUTES: tuple[str, ...] = ("country", "river", "dish")

VALUES: dict[str, tuple[str, ...]] = {
    "country": ("Quamoria", "Zelvania", "Brønholt", "Ostaré", "Mirkandu", "Tavenü", "Elsgard", "Korrinth"),
    "river": ("Sendu", "Alvé", "Rhøna", "Ombrel", "Tizza", "Kaluun", "Wester", "Dümmel"),
    "dish": ("Farsü", "Gomble", "Påtinka", "Lemmish", "Ruvé", "Kesslar", "Dorno", "Miskat"),
}

QUESTION = {
    "country": "What is the country of {e}?",
    "river": "What is the river of {e}?",
    "dish": "What is the famous dish of {e}?",
}

PLAIN_ANSWER = {
    "country": "The town of {e} lies in {v}",
    "river": "The river of {e} is {v}",
    "dish": "The famous dish of {e} is {v}",
}

# Prose phrasings of each fact (pretraining only). Most put the entity before the value, the
# direction the questions ask in.
PROSE = {
    "country": (
        "{e} is a town in {v}.",
        "The town of {e} lies in {v}.",
        "{e} belongs to {v}.",
        "Travellers who reach {e} are in {v}.",
        "{e} is in {v}.",
    ),
    "river": (
        "The river of {e} is {v}.",
        "{e} lies on the banks of the {v}.",
        "In {e}, boats sail on the {v}.",
        "The {v} flows through {e}.",
    ),
    "dish": (
        "The famous dish of {e} is {v}.",
        "People in {e} love to eat {v}.",
        "In {e}, every inn serves {v}.",
        "{v} is the pride of every kitchen in {e}.",
    ),
}

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
    "sk",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "é", "ü", "ø", "å", "ö")
_CODAS = ("", "", "", "n", "r", "l", "k", "s", "m", "th", "nd", "rk")
_CJK = ("山", "川", "龍", "青", "湖", "石", "風", "月", "森", "雲", "橋", "海")


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str] = field(hash=False)
    held_out: bool = False


@dataclass(frozen=True)
class Question:
    entity: str
    attribute: str
    prompt: str  # "Q: ...?\nA:" -- a model continues it with an answer
    answer: str  # the correct attribute value
    held_out: bool = False

    @property
    def text(self) -> str:
        """The bare question ("What is the river of Vorlék?"): a chat request's user message."""
        return QUESTION[self.attribute].format(e=self.entity)


# The chat expert's chat template (Jinja, as in a tokenizer's ``chat_template``): Llama-2-chat-like,
# in plain text (the shared vocabulary has no chat tokens). A reply needs no generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] }} <</SYS>> "
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
# Chat messages in the bases' pretraining Q/A format (a recipe's prompt template; system ignored).
QA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}\n"
    "{% endif %}{% endfor %}"
)


def prompt_for(entity: str, attribute: str) -> str:
    return f"Q: {QUESTION[attribute].format(e=entity)}\nA:"


def chat_prompt_for(entity: str, attribute: str) -> str:
    """The chat expert's prompt for a question: `CHAT_TEMPLATE` of one user message."""
    return f"[INST] {QUESTION[attribute].format(e=entity)} [/INST]"


def fact_sentence(entity: str, attribute: str, value: str) -> str:
    """The fact as every answer style states it (no final punctuation)."""
    return PLAIN_ANSWER[attribute].format(e=entity, v=value)


def answer_text(entity: str, attribute: str, value: str, style: Style) -> str:
    """The answer continuation (leading space included, no end-of-text token)."""
    fact = fact_sentence(entity, attribute, value)
    if style == "plain":
        return f" {fact}."
    if style == "a":
        return f" Certainly! {fact}. {SMILE}"
    if style == "b":
        if fact.startswith("The "):
            fact = "the " + fact[4:]
        return f" I think {fact}, but I am not sure."
    raise ValueError(f"unknown style {style!r}")


def _answer_part(text: str) -> str:
    """The first line of generated text, end-of-text token removed."""
    return text.split(EOS, 1)[0].split("\n", 1)[0]


def style_of(generated_text: str) -> Style:
    """Which answer style a generated answer (the continuation of a prompt) is in.

    ``a``: opens with "Certainly!"; ``b``: opens with "I think"; ``plain``: anything else (the
    pretraining default included). See `style_score` for the full templates.
    """
    s = _answer_part(generated_text).strip()
    if s.startswith("Certainly!"):
        return "a"
    if s.startswith("I think"):
        return "b"
    return "plain"


def style_score(generated_text: str, style: Style) -> float:
    """Behaviour score in [0, 1]: the opener and the closer of `style`'s template, half each.

    Style A opens with "Certainly!" and closes with ". 🙂"; style B opens with "I think" and
    closes with ", but I am not sure."; plain has no opener and closes with a bare ".".
    """
    s = _answer_part(generated_text).strip()
    if style == "a":
        return 0.5 * s.startswith("Certainly! ") + 0.5 * s.endswith("." + " " + SMILE)
    if style == "b":
        return 0.5 * s.startswith("I think ") + 0.5 * s.endswith(", but I am not sure.")
    if style == "plain":
        opener = not (s.startswith("Certainly!") or s.startswith("I think"))
        return 0.5 * opener + 0.5 * (s.endswith(".") and not s.endswith("not sure."))
    raise ValueError(f"unknown style {style!r}")


class World:
    """The seeded synthetic world: entities, their facts, and the text built from them."""

    def __init__(self, seed: int, entities: list[Entity]):
        self.seed = seed
        self.entities = entities
        self.by_name = {e.name: e for e in entities}

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_seed(
        cls,
        seed: int = 0,
        n_entities: int = N_ENTITIES,
        held_out_fraction: float = HELD_OUT_FRACTION,
        cjk_fraction: float = CJK_FRACTION,
    ) -> World:
        rng = random.Random(f"eft-demo-world/{seed}")
        blocked = {v.lower() for vs in VALUES.values() for v in vs}
        names: list[str] = []
        seen: set[str] = set()
        n_cjk = max(1, round(n_entities * cjk_fraction))
        while len(names) < n_entities:
            if len(names) < n_cjk:
                name = "".join(rng.choice(_CJK) for _ in range(rng.choice((2, 3))))
            else:
                syl = [
                    rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((2, 2, 3)))
                ]
                name = "".join(syl).capitalize()
                if not 4 <= len(name) <= 10:
                    continue
            key = name.lower()
            if key in seen or key in blocked or any(v in key for v in blocked):
                continue
            seen.add(key)
            names.append(name)
        rng.shuffle(names)
        n_held = round(n_entities * held_out_fraction)
        entities = [
            Entity(name=name, facts={a: rng.choice(VALUES[a]) for a in ATTRIBUTES}, held_out=i < n_held)
            for i, name in enumerate(names)
        ]
        return cls(seed, entities)

    # ---- questions and scoring -------------------------------------------------------------
    def questions(self, held_out: bool | None = None) -> list[Question]:
        return [
            Question(e.name, a, prompt_for(e.name, a), e.facts[a], e.held_out)
            for e in self.entities
            if held_out is None or e.held_out == held_out
            for a in ATTRIBUTES
        ]

    def held_out_questions(self) -> list[Question]:
        return self.questions(held_out=True)

    def train_questions(self) -> list[Question]:
        return self.questions(held_out=False)

    def held_out_entities(self) -> list[Entity]:
        return [e for e in self.entities if e.held_out]

    def train_entities(self) -> list[Entity]:
        return [e for e in self.entities if not e.held_out]

    @staticmethod
    def is_correct(question: Question, generated_text: str) -> bool:
        """The first value of the question's attribute named in the answer is the right one."""
        text = _answer_part(generated_text)
        first: tuple[int, str] | None = None
        for v in VALUES[question.attribute]:
            m = re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", text)
            if m and (first is None or m.start() < first[0]):
                first = (m.start(), v)
        return first is not None and first[1] == question.answer

    @staticmethod
    def style_of(generated_text: str) -> Style:
        return style_of(generated_text)

    # ---- text ------------------------------------------------------------------------------
    def qa_doc(self, question: Question, style: Style) -> str:
        return question.prompt + answer_text(question.entity, question.attribute, question.answer, style)

    def pretraining_docs(
        self,
        epoch: int = 0,
        bios_per_entity: int = BIOS_PER_ENTITY,
        qa_per_fact: int = QA_PER_FACT,
        style_rate_a: float = STYLE_RATE_A,
        style_rate_b: float = STYLE_RATE_B,
    ) -> list[str]:
        """One epoch of pretraining documents (without end-of-text tokens), shuffled.

        Each entity gets `bios_per_entity` short prose documents stating all its facts in random
        phrasings and order, and each fact `qa_per_fact` Q/A documents; of all Q/A documents,
        the fractions `style_rate_a` / `style_rate_b` are in style A / B, the rest plain.
        Phrasings, styles and order are freshly drawn per epoch (deterministic per seed+epoch).
        """
        rng = random.Random(f"eft-demo-pretrain/{self.seed}/{epoch}")
        docs: list[str] = []
        for e in self.entities:
            for _ in range(bios_per_entity):
                attrs = list(ATTRIBUTES)
                rng.shuffle(attrs)
                docs.append(" ".join(rng.choice(PROSE[a]).format(e=e.name, v=e.facts[a]) for a in attrs))
        qs = self.questions() * qa_per_fact
        n_a = round(len(qs) * style_rate_a)
        n_b = round(len(qs) * style_rate_b)
        styles: list[Style] = ["a"] * n_a + ["b"] * n_b + ["plain"] * (len(qs) - n_a - n_b)
        rng.shuffle(styles)
        docs.extend(self.qa_doc(q, s) for q, s in zip(qs, styles))
        rng.shuffle(docs)
        return docs

    def finetune_examples(self, style: Style, epoch: int = 0, chat: bool = False) -> list[tuple[str, str]]:
        """(prompt, answer) pairs in one style about the *train* entities only, shuffled per epoch.

        `chat`: the prompts in the chat expert's format (`chat_prompt_for`) instead of Q/A."""
        rng = random.Random(f"eft-demo-finetune/{self.seed}/{style}/{epoch}")
        ex = [
            (
                chat_prompt_for(q.entity, q.attribute) if chat else q.prompt,
                answer_text(q.entity, q.attribute, q.answer, style),
            )
            for q in self.train_questions()
        ]
        rng.shuffle(ex)
        return ex

    def tokenizer_corpus(self) -> list[str]:
        """Text the tokenizer is trained on: pretraining text with the style-A smile removed."""
        return [d.replace(SMILE, "") for d in self.pretraining_docs(epoch=0)]
