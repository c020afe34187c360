"""Synthetic biographies: a knowledge corpus where every fact is known, in the style of the bioS
data of "Physics of Language Models", part 3 (Allen-Zhu and Li, 2024).

Each person has an invented three-word name (first, middle, last; several tokens each) and six
attributes: birth date, birth city, university, major, employer, and the employer's city (a
function of the employer, as in bioS). A biography states the six facts in six sentences, each
from one of several paraphrase templates; per attribute the last `HELD_OUT_TEMPLATES` templates
never appear in training and render the validation split, so validation loss measures knowledge
that moved beyond its training phrasing. Question-answer pairs are written for every attribute;
those of a `qa_fraction` of the people go into training (the model learns the QA format on them),
the others only into `probes.jsonl` (knowledge extraction on people seen only in biographies).

Everything is a pure function of (people, seed): names, value pools, people, templates chosen.
All names are invented from syllables, so no fact can come from outside the corpus.

    DIR/train.jsonl, val.jsonl, corpus.json   as every corpus (engram.data.corpora)
    DIR/people.jsonl                          the world: one person per line, every attribute
    DIR/probes.jsonl                          QA probes: person, attribute, prompt, answer, in_training

(people and probes are read back, checksummed, with `engram.data.corpora.read_extra_records`.)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .corpora import seal_corpus, write_jsonl

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
# bioS's pool sizes: 400 first, 400 middle and 1000 last names; 200 cities, 300 universities,
# 100 majors, 263 employers; days 1-28 of 12 months of the years 1900-2099.
N_FIRST, N_MIDDLE, N_LAST = 400, 400, 1000
N_CITIES, N_UNIVERSITIES, N_MAJORS, N_EMPLOYERS = 200, 300, 100, 263
YEARS = (1900, 2099)
DAYS = 28
HELD_OUT_TEMPLATES = 2

TEMPLATES = {
    "birth_date": ("{name} was born on {value}.", "{name} came into this world on {value}.",
                   "{name}'s birthday falls on {value}.", "{name} celebrates a birthday on {value}.",
                   "The birth date of {name} is {value}.", "{name} arrived on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} spent the early years in {value}.",
                   "{name}'s birthplace is {value}.", "{name} hails from {value}.",
                   "{name} grew up in {value}.", "The hometown of {name} is {value}."),
    "university": ("{name} studied at {value}.", "{name} graduated from {value}.",
                   "{name} received an education at {value}.", "{name} attended {value}.",
                   "{name} is an alumnus of {value}.", "{name} completed a degree at {value}."),
    "major": ("{name} majored in {value}.", "{name} specialized in {value}.", "{name}'s field of study was {value}.",
              "{name} focused on the study of {value}.", "{name} earned a degree in {value}.",
              "{name} chose to major in {value}."),
    "employer": ("{name} works for {value}.", "{name} is employed by {value}.", "{name} has a job at {value}.",
                 "{name} is on the staff of {value}.", "{name} earns a living at {value}.", "{name} joined {value}."),
    "employer_city": ("{name} works in {value}.", "{name}'s office is in {value}.",
                      "{name} commutes to work in {value}.", "{name} is based in {value} for work.",
                      "{name} has a workplace in {value}.", "{name} goes to work in {value}."),
}
QUESTIONS = {
    "birth_date": "When was {name} born?", "birth_city": "Where was {name} born?",
    "university": "Which university did {name} attend?", "major": "What did {name} study?",
    "employer": "Which company does {name} work for?", "employer_city": "Where does {name} work?",
}
_FIELDS = ("Physics", "Chemistry", "Biology", "Mathematics", "Economics", "History", "Philosophy", "Linguistics",
           "Geology", "Astronomy", "Psychology", "Sociology", "Architecture", "Music", "Literature", "Statistics",
           "Medicine", "Law", "Finance", "Engineering", "Ecology", "Anthropology", "Art", "Education", "Nursing")
_FIELD_KINDS = ("", "Applied ", "Theoretical ", "Computational ")
_UNIVERSITY_FORMS = ("{} University", "University of {}", "{} Institute of Technology", "{} College")
_COMPANY_KINDS = ("Systems", "Labs", "Industries", "Group", "Holdings", "Works", "Dynamics", "Foods", "Motors",
                  "Energy", "Logistics", "Networks", "Media", "Pharma", "Textiles")
_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pr", "r",
           "s", "sh", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m", "nd")


class SyntheticBiosError(ValueError):
    """An impossible request: too few or too many people, or bad fractions."""


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str


def attribute_choices() -> dict[str, int]:
    """How many values each attribute can take: the `|D|` of the bits-of-knowledge measure
    (employer_city is determined by the employer: one choice once the employer is known)."""
    return {"birth_date": len(MONTHS) * DAYS * (YEARS[1] - YEARS[0] + 1), "birth_city": N_CITIES,
            "university": N_UNIVERSITIES, "major": N_MAJORS, "employer": N_EMPLOYERS, "employer_city": 1}


def bits_per_person() -> float:
    """The information a biography holds beyond the name: sum of log2 |D| over attributes."""
    return sum(math.log2(n) for n in attribute_choices().values())


def invented_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """`count` distinct capitalized words of 2-3 syllables, none in `taken` (which grows)."""
    words = []
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables)).capitalize()
        if word not in taken and 4 <= len(word) <= 12:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class World:
    """The people and the value pools they were drawn from."""

    people: tuple[Person, ...]
    cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[str, ...]
    employer_city: dict[str, str]


def make_world(people: int, seed: int = 0) -> World:
    """`people` individuals with distinct names and independently drawn attributes."""
    max_people = N_FIRST * N_MIDDLE * N_LAST
    if not 2 <= people <= max_people:
        raise SyntheticBiosError(f"synthetic-bios needs 2 to {max_people:,} people (distinct first x middle x last "
                                 f"names), got {people:,}")
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    first, middle, last = (invented_words(rng, n, taken) for n in (N_FIRST, N_MIDDLE, N_LAST))
    cities = tuple(invented_words(rng, N_CITIES, taken))
    roots = invented_words(rng, N_UNIVERSITIES + N_EMPLOYERS, taken)
    universities = tuple(_UNIVERSITY_FORMS[i % len(_UNIVERSITY_FORMS)].format(r)
                         for i, r in enumerate(roots[:N_UNIVERSITIES]))
    employers = tuple(f"{r} {_COMPANY_KINDS[i % len(_COMPANY_KINDS)]}" for i, r in enumerate(roots[N_UNIVERSITIES:]))
    majors = tuple(k + f for k in _FIELD_KINDS for f in _FIELDS)
    employer_city = {e: cities[rng.integers(N_CITIES)] for e in employers}
    # distinct names: sample flat indices of the first x middle x last grid without replacement
    flat = rng.choice(max_people, size=people, replace=False)
    out = []
    for index in flat.tolist():
        f, rest = divmod(index, N_MIDDLE * N_LAST)
        m, l = divmod(rest, N_LAST)
        year = int(rng.integers(YEARS[0], YEARS[1] + 1))
        date = f"{MONTHS[rng.integers(12)]} {int(rng.integers(1, DAYS + 1))}, {year}"
        employer = employers[rng.integers(N_EMPLOYERS)]
        out.append(Person(name=f"{first[f]} {middle[m]} {last[l]}", birth_date=date,
                          birth_city=cities[rng.integers(N_CITIES)],
                          university=universities[rng.integers(N_UNIVERSITIES)], major=majors[rng.integers(N_MAJORS)],
                          employer=employer, employer_city=employer_city[employer]))
    return World(people=tuple(out), cities=cities, universities=universities, majors=majors, employers=employers,
                 employer_city=employer_city)


def biography(person: Person, rng: np.random.Generator, *, held_out: bool) -> str:
    """Six sentences in a random order, each from a random template of the training set (or of
    the held-out set)."""
    sentences = []
    for attribute in ATTRIBUTES:
        options = TEMPLATES[attribute]
        options = options[-HELD_OUT_TEMPLATES:] if held_out else options[:-HELD_OUT_TEMPLATES]
        sentences.append(options[rng.integers(len(options))].format(name=person.name,
                                                                    value=getattr(person, attribute)))
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


def qa_prompt(person: Person, attribute: str) -> str:
    """The question, up to the answer (which follows after one space)."""
    return f"Question: {QUESTIONS[attribute].format(name=person.name)}\nAnswer:"


def completion_prompt(person: Person, attribute: str, template: int = 0) -> str:
    """A biography sentence of `template` cut before the value (which follows after one space)."""
    return TEMPLATES[attribute][template].format(name=person.name, value="\0").split(" \0")[0]


def _qa_document(person: Person) -> str:
    return "\n".join(f"{qa_prompt(person, a)} {getattr(person, a)}." for a in ATTRIBUTES)


def synthetic_documents(people: int, seed: int = 0, *, bios_per_person: int = 5, qa_fraction: float = 0.5
                        ) -> tuple[World, list[dict], list[dict], list[dict]]:
    """(world, train documents, validation documents, QA probes). Training: `bios_per_person`
    biographies per person (training templates) and the QA document of the first `qa_fraction`
    of the people; validation: one held-out-template biography per person."""
    if bios_per_person < 1:
        raise SyntheticBiosError(f"bios_per_person must be >= 1, got {bios_per_person}")
    if not 0.0 <= qa_fraction <= 1.0:
        raise SyntheticBiosError(f"qa_fraction must be in [0, 1], got {qa_fraction}")
    world = make_world(people, seed)
    rng = np.random.default_rng([seed, 1])
    n_qa = round(qa_fraction * people)
    train, val, probes = [], [], []
    for i, person in enumerate(world.people):
        for _ in range(bios_per_person):
            train.append({"text": biography(person, rng, held_out=False), "person": i, "kind": "bio"})
        val.append({"text": biography(person, rng, held_out=True), "person": i, "kind": "bio_held_out"})
        if i < n_qa:
            train.append({"text": _qa_document(person), "person": i, "kind": "qa"})
        probes += [{"person": i, "attribute": a, "prompt": qa_prompt(person, a), "answer": getattr(person, a),
                    "in_training": i < n_qa} for a in ATTRIBUTES]
    order = rng.permutation(len(train))  # people interleaved, as a shuffled pretraining corpus
    return world, [train[j] for j in order], val, probes


def build_synthetic_bios(out_dir: str | os.PathLike, *, people: int, seed: int = 0, bios_per_person: int = 5,
                         qa_fraction: float = 0.5) -> dict[str, Any]:
    """Write the corpus folder (see the module docstring); returns the corpus.json dict."""
    world, train, val, probes = synthetic_documents(people, seed, bios_per_person=bios_per_person,
                                                    qa_fraction=qa_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": "synthetic-bios", "license": "generated by engram-torch (no third-party text)", "seed": seed,
            "people": people, "bios_per_person": bios_per_person, "qa_fraction": qa_fraction,
            "attribute_choices": attribute_choices(), "bits_per_person": bits_per_person(),
            "held_out_templates": HELD_OUT_TEMPLATES}
    info["train"] = write_jsonl(out / "train.jsonl", train)
    info["val"] = write_jsonl(out / "val.jsonl", val)
    info["extra_files"] = {"people": write_jsonl(out / "people.jsonl", [asdict(p) for p in world.people]),
                           "probes": write_jsonl(out / "probes.jsonl", probes)}
    return seal_corpus(out, info)

