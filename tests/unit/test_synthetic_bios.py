"""Synthetic biographies: deterministic, distinct invented names, held-out templates kept out of
training, QA probes split by who has QA in training, and clear errors for impossible sizes."""

import json
import math
import re

import pytest

from engram.cli.main import main
from engram.data.dataset import PreparedData
from engram.data.corpora import read_extra_records
from engram.data.sources import CorpusError
from engram.data.synthetic_bios import (ATTRIBUTES, HELD_OUT_TEMPLATES, TEMPLATES, SyntheticBiosError,
                                         attribute_choices, bits_per_person, completion_prompt, make_world,
                                         synthetic_documents)


def fixed_words(template):
    """The longest literal piece of a template: what shows that a text used it."""
    return max(re.split(r"\{name\}|\{value\}", template), key=len).strip()


def test_the_same_seed_gives_the_same_corpus_and_another_seed_another():
    a, b, c = (synthetic_documents(300, seed) for seed in (3, 3, 4))
    assert a[1:] == b[1:] and a[0] == b[0]
    assert a[1] != c[1] and a[0].people != c[0].people


def test_people_have_distinct_multi_word_invented_names_and_consistent_employer_cities():
    world = make_world(2000, seed=0)
    names = [p.name for p in world.people]
    assert len(set(names)) == 2000 and all(len(n.split()) == 3 for n in names)
    pools = set(world.cities) | set(world.universities) | set(world.employers) | set(world.majors)
    assert not set(names) & pools
    for p in world.people:
        assert p.employer_city == world.employer_city[p.employer] and p.birth_city in world.cities
        month, day, year = re.fullmatch(r"(\w+) (\d+), (\d+)", p.birth_date).groups()
        assert 1 <= int(day) <= 28 and 1900 <= int(year) <= 2099
    assert attribute_choices()["birth_date"] == 12 * 28 * 200
    assert bits_per_person() == pytest.approx(math.log2(12 * 28 * 200 * 200 * 300 * 100 * 263))


def test_held_out_templates_render_validation_only_and_qa_goes_to_the_first_half():
    world, train, val, probes = synthetic_documents(200, 1, bios_per_person=3, qa_fraction=0.5)
    train_bios = " ".join(d["text"] for d in train if d["kind"] == "bio")
    val_bios = " ".join(d["text"] for d in val)
    for attribute in ATTRIBUTES:
        for t in TEMPLATES[attribute][-HELD_OUT_TEMPLATES:]:
            assert fixed_words(t) not in train_bios and fixed_words(t) in val_bios, t
        for t in TEMPLATES[attribute][:-HELD_OUT_TEMPLATES]:
            assert fixed_words(t) in train_bios and fixed_words(t) not in val_bios, t
    per_person = {}
    for d in train:
        per_person.setdefault(d["person"], []).append(d["kind"])
    assert all(kinds.count("bio") == 3 for kinds in per_person.values())
    assert {i for i, kinds in per_person.items() if "qa" in kinds} == set(range(100))
    assert len(probes) == 200 * 6 and sum(p["in_training"] for p in probes) == 100 * 6
    p0 = probes[0]
    assert p0["prompt"].endswith("Answer:") and world.people[p0["person"]].birth_date == p0["answer"]
    # every fact of every person is stated in each of their training biographies
    person = world.people[7]
    bios = [d["text"] for d in train if d["person"] == 7 and d["kind"] == "bio"]
    assert all(getattr(person, a) in bio for bio in bios for a in ATTRIBUTES)
    assert completion_prompt(person, "birth_city") == f"{person.name} was born in"


@pytest.mark.parametrize("people", [0, 1, 400 * 400 * 1000 + 1])
def test_impossible_sizes_are_clear_errors(people):
    with pytest.raises(SyntheticBiosError, match="needs 2 to 160,000,000 people"):
        make_world(people)


def test_bad_options_are_clear_errors():
    with pytest.raises(SyntheticBiosError, match="qa_fraction"):
        synthetic_documents(10, qa_fraction=1.5)
    with pytest.raises(SyntheticBiosError, match="bios_per_person"):
        synthetic_documents(10, bios_per_person=0)


def test_data_build_command_writes_a_checked_dataset(tmp_path, capsys):
    out = tmp_path / "bios"
    assert main(["data", "build", "--corpus", "synthetic-bios", "--people", "60", "--seed", "2", "--vocab-size", "600",
                 "--out", str(out)]) == 0
    data = PreparedData.open(out)
    info = json.loads((out / "corpus.json").read_text())
    assert info["people"] == 60 and info["val"]["documents"] == 60 and info["train"]["documents"] == 60 * 5 + 30
    people = read_extra_records(out, "people")
    assert len(people) == 60 and people == [vars(p) for p in make_world(60, 2).people]
    assert len(read_extra_records(out, "probes")) == 360
    # names are several tokens each with the corpus' own tokenizer
    lengths = [len(data.tokenizer.encode(" " + p["name"]).ids) for p in people]
    assert min(lengths) >= 2
    (out / "probes.jsonl").write_text("")
    with pytest.raises(CorpusError, match="does not match corpus.json"):
        read_extra_records(out, "probes")
    with pytest.raises(CorpusError, match="has no 'people' records"):
        read_extra_records(tmp_path / "x", "people")
    assert main(["data", "build", "--corpus", "synthetic-bios", "--out", str(tmp_path / "x")]) == 2
    assert "the synthetic-bios corpus needs --people N" in capsys.readouterr().err
    assert main(["data", "build", "--corpus", "wiki-en", "--people", "5", "--out", str(tmp_path / "y")]) == 2
    assert "--people sizes a generated corpus" in capsys.readouterr().err
