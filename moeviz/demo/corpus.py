"""The demo model's synthetic corpus: five domains, each with a held-out task.

Every domain is a generator of *examples*: a prompt and its answer (``"37+48="``,
``"85"``). An example's text is ``prompt + answer``; a hash of that text puts it in the
``train`` or the ``heldout`` split, so a held-out example never occurs in training text,
whatever the seed. A document is a few examples of one domain, each ending in ``SEP``.

    arithmetic  37+48=85                                      two-digit addition
    sequences   rev kqzd:dzqk                                 reverse 3-6 letters
    prose       the queens near the king blamed themselves.   reflexive agreement past an attractor
    code        k=7;m=3*k;assert m==21                        evaluate an expression (or a list's len)
    dates       ana swam on monday. two days later it was wednesday.   weekday / month arithmetic
"""

from __future__ import annotations

import hashlib
import operator
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SEP = "\n"  # ends every example
DOC_CHARS = 96  # a document grows by whole examples until it has at least this many characters
HELDOUT_PERCENT = 10  # share of the example space reserved for held-out text and tasks
SPLITS = ("train", "heldout")
# Every character the corpus can produce; the demo tokenizer is one token per character.
ALPHABET = string.ascii_lowercase + string.digits + " .,:;=+-*()[]" + SEP


@dataclass(frozen=True)
class TaskExample:
    """One held-out task item: greedy completion of ``prompt`` must give exactly ``answer``."""

    domain: str
    prompt: str
    answer: str


Example = tuple[str, str]  # (prompt, answer)


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def _sequences(rng: random.Random) -> Example:
    letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"rev {letters}:", letters[::-1]


# prose: (singular, plural, reflexive pronoun of the singular)
_NOUNS = (
    ("king", "kings", "himself"), ("boy", "boys", "himself"), ("man", "men", "himself"),
    ("father", "fathers", "himself"), ("prince", "princes", "himself"), ("uncle", "uncles", "himself"),
    ("queen", "queens", "herself"), ("girl", "girls", "herself"), ("woman", "women", "herself"),
    ("mother", "mothers", "herself"), ("princess", "princesses", "herself"), ("aunt", "aunts", "herself"),
    ("robot", "robots", "itself"), ("machine", "machines", "itself"), ("dog", "dogs", "itself"),
    ("cat", "cats", "itself"),
)
_ADJECTIVES = ("", "old ", "young ", "tall ", "small ", "happy ")
_PREPOSITIONS = ("near", "behind", "with", "beside", "like")
_VERBS = ("blamed", "hurt", "saw", "washed", "praised", "fed", "helped", "loved")


def _noun_phrase(rng: random.Random) -> tuple[str, str]:
    """A random noun phrase and the reflexive pronoun that agrees with it."""
    singular, plural, pronoun = rng.choice(_NOUNS)
    if rng.random() < 0.5:
        return f"the {rng.choice(_ADJECTIVES)}{plural}", "themselves"
    return f"the {rng.choice(_ADJECTIVES)}{singular}", pronoun


def _prose(rng: random.Random) -> Example:
    subject, pronoun = _noun_phrase(rng)
    attractor, _ = _noun_phrase(rng)
    verb = rng.choice(_VERBS)
    if rng.random() < 0.5:
        return f"{subject} {rng.choice(_PREPOSITIONS)} {attractor} {verb}", f" {pronoun}."
    return f"{subject} that {attractor} {rng.choice(_VERBS)} {verb}", f" {pronoun}."


def _code(rng: random.Random) -> Example:
    """An assignment, then an assertion: an expression of the variable, or a list's length."""
    name, result = rng.sample(string.ascii_lowercase, 2)
    if rng.random() < 0.3:
        values = ",".join(str(rng.randrange(10)) for _ in range(rng.randint(1, 6)))
        return f"{name}=[{values}];assert len({name})==", str(values.count(",") + 1)
    value, constant, op = rng.randrange(10), rng.randint(1, 9), rng.choice("+-*")
    if rng.random() < 0.5:
        expression, answer = f"{name}{op}{constant}", _OPERATORS[op](value, constant)
    else:
        expression, answer = f"{constant}{op}{name}", _OPERATORS[op](constant, value)
    return f"{name}={value};{result}={expression};assert {result}==", str(answer)


_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)
_COUNTS = ("one", "two", "three", "four")
_NAMES = ("ana", "ben", "carl", "dora", "eve", "finn", "gus", "hana", "ivan", "jo", "kim", "lea")
_DAY_EVENTS = ("swam", "ran", "sang", "cooked", "read", "slept late", "went out", "worked")
_MONTH_EVENTS = ("was born", "moved", "got married", "started school", "went abroad", "found a job")


def _dates(rng: random.Random) -> Example:
    count_idx = rng.randrange(len(_COUNTS))
    name = rng.choice(_NAMES)
    if rng.random() < 0.5:
        day_idx = rng.randrange(len(_WEEKDAYS))
        unit, answer = "days", _WEEKDAYS[(day_idx + count_idx + 1) % len(_WEEKDAYS)]
        context = f"{name} {rng.choice(_DAY_EVENTS)} on {_WEEKDAYS[day_idx]}."
    else:
        month_idx = rng.randrange(len(_MONTHS))
        unit, answer = "months", _MONTHS[(month_idx + count_idx + 1) % len(_MONTHS)]
        context = f"{name} {rng.choice(_MONTH_EVENTS)} in {_MONTHS[month_idx]}."
    unit = unit[:-1] if count_idx == 0 else unit
    return f"{context} {_COUNTS[count_idx]} {unit} later it was", f" {answer}."


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic,
    "sequences": _sequences,
    "prose": _prose,
    "code": _code,
    "dates": _dates,
}
DOMAINS: tuple[str, ...] = tuple(_GENERATORS)


def split_of(text: str) -> str:
    """The split an example text belongs to, fixed by a hash of the text (not by any seed)."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _check(domain: str, split: str) -> None:
    if domain not in _GENERATORS:
        raise ValueError(f"Unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _examples(domain: str, split: str, rng: random.Random) -> Iterator[Example]:
    """Endless examples of one domain drawn from one split (rejection by hash)."""
    generate = _GENERATORS[domain]
    while True:
        prompt, answer = generate(rng)
        if split_of(prompt + answer) == split:
            yield prompt, answer


def documents(domain: str, split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` texts of one domain and split, each a few examples ending in ``SEP``.

    Same arguments give the same texts; ``heldout`` texts share no example with ``train``.
    """
    _check(domain, split)
    examples = _examples(domain, split, random.Random(f"{domain}/{split}/{seed}"))
    docs = []
    for _ in range(n):
        doc = ""
        while len(doc) < DOC_CHARS:
            prompt, answer = next(examples)
            doc += prompt + answer + SEP
        docs.append(doc)
    return docs


def task_examples(domain: str, n: int, seed: int = 0) -> list[TaskExample]:
    """``n`` distinct held-out task items of one domain (never in any ``train`` text)."""
    _check(domain, "heldout")
    examples = _examples(domain, "heldout", random.Random(f"{domain}/task/{seed}"))
    items: dict[Example, None] = {}  # an ordered set
    for _ in range(100 * n):
        if len(items) == n:
            break
        items[next(examples)] = None
    if len(items) < n:
        raise ValueError(f"{domain} has fewer than {n} distinct held-out task items")
    return [TaskExample(domain, prompt, answer) for prompt, answer in items]
