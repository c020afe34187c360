import pytest

from engram.data.dataset import prepare_dataset

WORDS = ("the river city north empire king queen music science history war trade island mountain "
         "language church school river valley bridge army fleet harbor castle").split()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A tiny prepared dataset (60 generated documents, 300-id BPE), built once per session."""
    return build_small_dataset(tmp_path_factory.mktemp("corpus"))


def build_small_dataset(root):
    """60 documents from a seeded generator and a 300-id BPE: the same bytes on every machine."""
    import random

    docs = root / "docs"
    docs.mkdir()
    rng = random.Random(0)
    for i in range(60):
        words = [rng.choice(WORDS) for _ in range(rng.randint(40, 120))]
        (docs / f"doc{i:03d}.txt").write_text(f"Document {i}. " + " ".join(words) + ".")
    return prepare_dataset(root / "data", inputs=[docs], vocab_size=300, val_fraction=0.2, log=lambda *a: None)


@pytest.fixture(scope="session")
def trained_run(small_dataset, tmp_path_factory):
    """A 4-step run of the default model on `small_dataset` (two checkpoints)."""
    from engram.cli.main import main

    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--out", str(out), "--data", str(small_dataset), "--max-steps", "4", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "2", "--checkpoint-every", "2"])
    assert code == 0
    return out


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")]


@pytest.fixture(scope="session")
def titled_dataset(tmp_path_factory):
    """A tiny prepared dataset from .jsonl documents with titles (two-word names) and a few
    "X is the capital of Y" sentences, for the entity and knowledge experiments."""
    import json
    import random

    root = tmp_path_factory.mktemp("titled")
    rng = random.Random(1)
    titles = ["River Castle", "North Empire", "Island Harbor", "Queen Music", "Mountain Valley"]
    lines = []
    for i in range(60):
        title = titles[i % len(titles)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(30, 80))]
        capital, country = CAPITALS[i % 2][1], CAPITALS[i % 2][0]  # Paris and Tokyo are stated
        text = f"The {title} is old. " + " ".join(words) + f". {capital} is the capital of {country}. The {title} ends."
        lines.append(json.dumps({"text": text, "title": title}))
    (root / "docs.jsonl").write_text("\n".join(lines))
    return prepare_dataset(root / "data", inputs=[root / "docs.jsonl"], vocab_size=300, val_fraction=0.2,
                           log=lambda *a: None)
