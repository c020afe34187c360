"""`engram serve`'s command line for vLLM (no vLLM needed): tables and named overlays become
the plugin's hf-overrides, and bad overlay arguments are one line, exit 2."""

import json

import pytest

from engram.cli.main import main
from engram.vllm_plugin.launch import server_command


def test_tables_and_overlays_become_hf_overrides(tmp_path):
    cmd = server_command(tmp_path / "m", tables=tmp_path / "t", cache_rows=64, overlays={"alice": "ov/a"})
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides == {"engram_tables": str((tmp_path / "t").resolve()), "engram_cache_rows": 64,
                         "engram_overlays": {"alice": str((tmp_path.cwd() / "ov" / "a").resolve())}}


@pytest.mark.parametrize("flag, message", [("bad name=x", "give NAME=DIR"), ("a={tmp}", "is not an overlay folder"),
                                           ("a={ov} --overlay a={ov}", "gives a name twice")])
def test_bad_overlay_arguments_are_one_line(tmp_path, capsys, flag, message):
    (tmp_path / "ov").mkdir()
    (tmp_path / "ov" / "overlay.json").write_text("{}")
    argv = ["serve", str(tmp_path)]
    for part in flag.format(tmp=tmp_path, ov=tmp_path / "ov").split(" --overlay "):
        argv += ["--overlay", part]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0, err
