"""The plugin serves the Engram tables resident, from host memory, from disk (memory-mapped,
behind a hot-row cache) and quantized (int8), with the tokens engram itself gives for the
same tables; a corrupt table file is refused at start, naming the file."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM venv "
                    "(pip install -e '.[vllm]', docs/serving.md)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm.harness import Engine, bios_prompts, write_folder  # noqa: E402

from engram import generate  # noqa: E402
from engram.cli.main import main as engram_main  # noqa: E402
from engram.runs import open_run  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_tables")
    folder = write_folder(root / "dense", train_steps=150)
    for kind in ("fp32", "int8"):
        assert engram_main(["offload", str(folder), "--out", str(root / kind), "--dtype", kind]) == 0
    return folder, root


def reference_tokens(folder, prompts, tables=None):
    model = open_run(folder, tables=tables).model
    return [generate(model, [p], 24, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("tier", ["host", "disk", "int8"])
def test_tables_off_the_device_give_engrams_tokens(served, tier):
    folder, root = served
    prompts = bios_prompts(folder, [30, 80, 55])
    overrides = {"host": {"engram_table_tier": "host"},
                 "disk": {"engram_tables": str(root / "fp32"), "engram_cache_rows": 64},
                 "int8": {"engram_tables": str(root / "int8")}}[tier]
    tables = overrides.get("engram_tables")
    expected = reference_tokens(folder, prompts, tables)
    if tier != "int8":  # plain rows off the device are the resident rows, bit for bit
        assert expected == reference_tokens(folder, prompts)
    with Engine(folder, block_size=32, hf_overrides=overrides) as engine:
        outs = engine.generate(prompts)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_corrupt_table_is_refused_at_start(served, tmp_path, capfd):
    folder, root = served
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (root / "fp32").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "layer2.bin").read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the middle of the rows
    (bad / "layer2.bin").write_bytes(bytes(data))
    with pytest.raises(Exception):
        Engine(folder, block_size=32, hf_overrides={"engram_tables": str(bad)})
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "layer2.bin" in err and "does not match its crc32" in err
