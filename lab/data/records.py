"""The fine-tuning task and the forgetting probes, all generated or written here, all scored deterministically.

The task ("event records"): an instruction such as ``Log this event: Maria moved to Lisbon in 2019.`` is to be
answered with exactly one JSON object ``{"who": "Maria", "where": "Lisbon", "year": 2019}`` and nothing else.
The prompt never names the keys, so a model that has not been fine-tuned has no way to know the schema: it is a
house format that only training can teach. Test prompts use names and cities that never occur in training.

Scoring is structural, on the greedy answer (never substring matching):

- ``format_ok``: ``json.loads`` of the whole answer (surrounding whitespace stripped) is an object with exactly
  the keys ``who``, ``where`` (strings) and ``year`` (an integer);
- ``exact``: ``format_ok`` and the three values equal the ones in the sentence.

Rates come with a Wilson 95 % interval. Forgetting is measured on general text (perplexity) and on
:data:`PROBES`, simple questions whose greedy answer by the base model is correct and is kept verbatim: a probe
counts as retained when the fine-tuned model's greedy answer is *identical* to it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from lab.errors import LabError

KEYS = ("who", "where", "year")

# Disjoint name and city pools: training uses the first part, test prompts only the rest.
NAMES = (
    "Maria",
    "Tom",
    "Aiko",
    "Lena",
    "Omar",
    "Sofia",
    "Jonas",
    "Priya",
    "Mateo",
    "Chloe",
    "Ivan",
    "Fatima",
    "Lucas",
    "Mei",
    "Noah",
    "Amara",
    "Pedro",
    "Hana",
    "Elias",
    "Zara",
    "Oscar",
    "Nadia",
    "Felix",
    "Ingrid",
    "Ravi",
    "Clara",
    "Tariq",
    "Yuki",
    "Greta",
    "Samuel",
    "Leila",
    "Hugo",
    "Anya",
    "Kofi",
    "Rosa",
    "Emil",
    "Dalia",
    "Marco",
    "Selin",
    "Jakob",
    "Nora",
    "Diego",
    "Alma",
    "Viktor",
    "Esme",
)
CITIES = (
    "Lisbon",
    "Cairo",
    "Osaka",
    "Berlin",
    "Lima",
    "Oslo",
    "Nairobi",
    "Toronto",
    "Madrid",
    "Hanoi",
    "Dublin",
    "Warsaw",
    "Santiago",
    "Vienna",
    "Seoul",
    "Athens",
    "Quito",
    "Prague",
    "Dakar",
    "Helsinki",
    "Manila",
    "Bogota",
    "Zurich",
    "Havana",
    "Tunis",
    "Perth",
    "Riga",
    "Montreal",
    "Kyoto",
    "Porto",
)
N_TRAIN_NAMES, N_TRAIN_CITIES = 30, 20
INSTRUCTIONS = (
    "Log this event: ",
    "Record this as an event: ",
    "Make a record of this: ",
    "Note this down: ",
    "File this event: ",
)
SENTENCES = (
    "{who} moved to {where} in {year}.",
    "{who} opened a bakery in {where} in {year}.",
    "In {year}, {who} started a new job in {where}.",
    "{who} got married in {where} in {year}.",
    "{who} ran a marathon in {where} in {year}.",
    "Back in {year}, {who} visited {where} for the first time.",
    "{who} graduated from university in {where} in {year}.",
    "{who} painted a mural in {where} in {year}.",
)

# Simple questions and SmolLM2-135M-Instruct's own greedy answers to them (default system prompt, checked by
# hand to be correct). A fine-tuned model "retains" a probe when its greedy answer is identical.
PROBES = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan? Reply with just the city name.", "The capital of Japan is Tokyo."),
    ("What is the opposite of hot? Reply with one word.", "The opposite of hot is cold."),
    ("What is the plural of mouse? Reply with one word.", "The plural of mouse is mice."),
    ("What is the chemical symbol for water? Reply with just the formula.", "The chemical symbol for water is H2O."),
    ("How many legs does a spider have? Reply with just the number.", "A spider has 8 legs."),
    ("How many days are in a week? Reply with just the number.", "A week is 7 days."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of England?", "The capital of England is London."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa, Canada."),
    ("What is the opposite of day?", "The opposite of day is night."),
    ("How many legs does a dog have?", "The answer to this classic question is 4. A dog has four legs."),
)


@dataclass(frozen=True)
class Example:
    """One instruction, its target answer, and the fields the answer must contain."""

    prompt: str
    answer: str
    who: str
    where: str
    year: int

    @property
    def fields(self) -> dict:
        return {"who": self.who, "where": self.where, "year": self.year}


@dataclass(frozen=True)
class TaskData:
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def answer_for(who: str, where: str, year: int) -> str:
    """The one correct answer text: compact JSON with keys in a fixed order."""
    return json.dumps({"who": who, "where": where, "year": year})


def _examples(n: int, names: tuple[str, ...], cities: tuple[str, ...], rng: random.Random) -> tuple[Example, ...]:
    out = []
    for _ in range(n):
        who, where, year = rng.choice(names), rng.choice(cities), rng.randint(1950, 2024)
        prompt = rng.choice(INSTRUCTIONS) + rng.choice(SENTENCES).format(who=who, where=where, year=year)
        out.append(Example(prompt, answer_for(who, where, year), who, where, year))
    return tuple(out)


def make_task(n_train: int = 100, n_test: int = 30, seed: int = 0) -> TaskData:
    """Seeded event-record examples; test examples use only names and cities absent from training."""
    if n_train < 0 or n_test < 0:
        raise LabError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rng = random.Random(seed)
    train = _examples(n_train, NAMES[:N_TRAIN_NAMES], CITIES[:N_TRAIN_CITIES], rng)
    test = _examples(n_test, NAMES[N_TRAIN_NAMES:], CITIES[N_TRAIN_CITIES:], rng)
    return TaskData(train, test)


def score_answer(text: str, fields: dict) -> tuple[bool, bool]:
    """(format_ok, exact) for one generated answer; see the module docstring for the rules."""
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, False
    if not isinstance(obj, dict) or set(obj) != set(KEYS):
        return False, False
    ok = (
        isinstance(obj["who"], str)
        and isinstance(obj["where"], str)
        and isinstance(obj["year"], int)
        and not isinstance(obj["year"], bool)
    )
    return ok, ok and all(obj[k] == fields[k] for k in KEYS)


def field_scores(text: str, fields: dict) -> dict[str, bool]:
    """Per key of :data:`KEYS`: does the answer hold exactly the right value? Only for well-formed answers
    (``score_answer``'s format rule); a malformed answer scores False on every field."""
    ok, _ = score_answer(text, fields)
    if not ok:
        return dict.fromkeys(KEYS, False)
    obj = json.loads(text.strip())
    return {k: obj[k] == fields[k] for k in KEYS}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n (95 % by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def chat_text(tokenizer, prompt: str, answer: str | None = None) -> str:
    """The model's chat format for one user turn (and the assistant's answer, closed, when given).

    Tokenizers without a chat template (the smoke BPE) get a plain ``User:/Assistant:`` layout closed by EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text if answer is None else text + answer + "<|im_end|>"
    text = f"User: {prompt}\nAssistant: "
    return text if answer is None else text + answer + tokenizer.eos_token


def end_token_id(tokenizer) -> int:
    """The id that ends an assistant turn (``<|im_end|>`` for chat models, EOS otherwise)."""
    if getattr(tokenizer, "chat_template", None):
        tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            return tid
    return tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    """A padding id (the end token when the tokenizer has none; padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)


def encode_example(tokenizer, ex: Example) -> dict[str, list[int]]:
    """Token ids of prompt + answer, with labels -100 on the prompt (the loss is on the answer only)."""
    prompt_ids = tokenizer(chat_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(chat_text(tokenizer, ex.prompt, ex.answer), add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:  # the answer must not merge with the prompt's last token
        raise LabError(f"prompt and answer tokenise together differently for {ex.prompt!r}")
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels}
