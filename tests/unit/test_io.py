"""Model and checkpoint files: durable writes (fsync before rename), and loading on the meta
device with the saved tensors assigned (no random init, ~1x peak memory, exact round trip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from engram import load_model, save_model
from engram.memory import HostTable
from engram.runs import load_checkpoint, restore_optimizers, save_checkpoint
from tests.tiny import build, small_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- durable writes


def _assert_durable(log, final: Path):
    """Every file of `final` and the folder were fsynced (under the temporary name) before the
    rename to `final`, and the parent after it."""
    final = final.resolve()
    renames = [i for i, e in enumerate(log) if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1, f"expected one rename onto {final}, got {[log[i] for i in renames]}"
    cut = renames[0]
    tmp = Path(log[cut][1])
    synced = {e[1] for e in log[:cut] if e[0] == "fsync"}
    want = {str(tmp / f.name) for f in final.iterdir()} | {str(tmp)}
    assert want <= synced, f"not fsynced before the rename: {sorted(want - synced)}"
    assert ("fsync", str(final.parent)) in log[cut + 1:], "the parent folder was not fsynced after the rename"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds via /proc")
def test_save_model_fsyncs_every_file_and_the_folder_before_the_rename(tmp_path, fsync_log):
    model = build(small_config())
    save_model(model, tmp_path / "m")
    _assert_durable(fsync_log, tmp_path / "m")
    fsync_log.clear()
    save_model(model, tmp_path / "m")  # replacing an existing folder
    _assert_durable(fsync_log, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "temporary or old folders left behind"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds via /proc")
def test_save_checkpoint_fsyncs_every_file_and_the_folder_before_the_rename(tmp_path, fsync_log):
    model = build(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randint(0, 97, (2, 8))).logits.sum().backward()
    opt.step()
    final = save_checkpoint(tmp_path, 5, model, [opt], {"seed": 1})
    _assert_durable(fsync_log, final)
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted(["config.json", "hash_layout.json", "model.safetensors", "optimizer.safetensors",
                            "optimizer.json", "trainer.json", "checksums.json"])
    assert sorted(json.loads((final / "checksums.json").read_text())) == sorted(set(names) - {"checksums.json"})
    again, state = load_checkpoint(final)
    assert state["step"] == 5
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
    restore_optimizers(final, [opt2])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_a_save_cut_between_its_renames_names_the_old_folder(tmp_path):
    save_model(build(small_config()), tmp_path / "m")
    os.replace(tmp_path / "m", tmp_path / ".m.old")  # the state after the first of the two renames
    with pytest.raises(FileNotFoundError, match=r"\.m\.old is there.*rename \.m\.old back to m"):
        load_model(tmp_path / "m")


# ---------------------------------------------------------------- loading
CONFIGS = {"engram_moe_mhc": dict(M=4), "tied_dense": dict(engram=False, tie_embeddings=True),
           "engram_tied": dict(tie_embeddings=True)}


def _perturbed(config):
    model = build(config)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router_bias.normal_()
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_never_initializes_randomly(name, tmp_path, monkeypatch):
    model = _perturbed(small_config(**CONFIGS[name]))
    save_model(model, tmp_path / "m")
    filled = []

    def spy(method):
        real = getattr(torch.Tensor, method)

        def wrapped(self, *a, **k):
            if not self.is_meta:  # building on meta is free; filling real memory is not
                filled.append((method, tuple(self.shape)))
            return real(self, *a, **k)
        return wrapped

    for method in ("normal_", "uniform_", "random_", "bernoulli_", "exponential_"):
        monkeypatch.setattr(torch.Tensor, method, spy(method))
    for fn in ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
               "xavier_normal_", "trunc_normal_", "orthogonal_"):
        real_fn = getattr(nn.init, fn)
        monkeypatch.setattr(nn.init, fn, lambda t, *a, _f=real_fn, _n=fn, **k:
                            (filled.append((_n, tuple(t.shape))) if not t.is_meta else None) or _f(t, *a, **k))
    load_model(tmp_path / "m")
    assert filled == [], f"load_model initialized real tensors randomly before loading: {filled[:5]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_model_equals_the_saved_one_bit_for_bit(name, device, tmp_path):
    model = _perturbed(small_config(**CONFIGS[name])).to(device)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m", device=device).eval()
    ids = torch.randint(0, 97, (2, 13), device=device)
    with torch.no_grad():
        want, got = model(ids).logits, again(ids).logits
    assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"
    # every tensor, saved or not (table offsets/sizes, MoE load counts), equals the original's
    sd_a = dict(model.named_buffers()) | dict(model.named_parameters())
    sd_b = dict(again.named_buffers()) | dict(again.named_parameters())
    assert sorted(sd_a) == sorted(sd_b)
    for k, v in sd_a.items():
        assert sd_b[k].device == v.device and sd_b[k].dtype == v.dtype and torch.equal(sd_b[k], v), k
    if model.config.tie_embeddings:
        assert again.lm_head.weight is again.embed.weight, "tied embeddings must stay one Parameter"
    assert len(list(again.parameters())) == len(list(model.parameters()))
    again.param_groups(lr=1e-3)  # asserts every parameter is in exactly one group
    # the loaded weights train: gradients flow and an optimizer updates them in place
    opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
    again.train()
    again(ids).logits.float().pow(2).mean().backward()
    before = again.embed.weight.detach().clone()
    opt.step()
    assert not torch.equal(again.embed.weight, before)


@pytest.mark.parametrize("device", DEVICES)
def test_table_factory_tables_and_buffers_end_on_the_device(device, tmp_path):
    model = _perturbed(small_config(M=4)).to(device)
    save_model(model, tmp_path / "m")
    made = []

    def factory(layer, sizes, dim):  # a host table, built with its offsets on the CPU
        made.append(layer)
        return HostTable.from_checkpoint(tmp_path / "m", layer, pin=False)

    again = load_model(tmp_path / "m", device=device, table_factory=factory).eval()
    assert made == model.engram_layers
    for layer in again.engram_layers:
        table = again.blocks[layer].engram.table
        assert isinstance(table, HostTable) and table.weight.device.type == "cpu"
        assert table.offsets.device.type == torch.device(device).type, "offsets must follow the compute device"
        assert torch.equal(table.offsets.cpu(), model.blocks[layer].engram.table.offsets.cpu())
    for name, t in [*again.named_parameters(), *again.named_buffers()]:
        assert t.device.type == torch.device(device).type and not t.is_meta, name
    ids = torch.randint(0, 97, (2, 11), device=device)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model.eval()(ids).logits)


# Peak RSS of the child alone. Not ru_maxrss: Linux carries it across fork + exec, so a child
# starts with the (big) pytest parent's peak. /proc/self/clear_refs "5" resets this process's
# VmHWM to its current RSS, which is the baseline. The baseline is taken after building the
# same config once on meta: the hasher's layout (~70 MB here, kept by the process) is not
# model memory and would otherwise blur the ratio.
_RSS_CHILD = textwrap.dedent("""
    import json, sys, torch
    from engram import EngramLM, load_model
    from engram.config import ModelConfig

    def status(key):
        with open("/proc/self/status") as f:
            return 1024 * int(next(line for line in f if line.startswith(key)).split()[1])

    torch.ones(1).sum()  # warm up torch's allocator and kernels before the baseline
    config = ModelConfig.from_dict(json.load(open(sys.argv[1] + "/config.json"))["model"])
    EngramLM(config, device="meta")  # built once and dropped: the hasher layout is in the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS:")
    model = load_model(sys.argv[1])
    total = sum(float(t.float().sum()) for t in model.state_dict().values() if t.is_floating_point())
    print(status("VmHWM:") - base, total)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_peaks_at_about_one_model_of_memory(tmp_path):
    """Tables of ~200 MB: loading and touching every weight adds < 1.5x the file to peak RSS
    (measured ~1.0x; the old to_empty + init_weights + copy path measured ~2.0x)."""
    import dataclasses

    config = small_config()
    config = dataclasses.replace(config, engram=dataclasses.replace(
        config.engram, rows_per_head=(800_011, 800_029)))
    model = EngramLM_on_meta_filled(config)
    save_model(model, tmp_path / "m")
    del model
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size > 180e6, f"the test model is only {size / 1e6:.0f} MB"
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "m")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    added, total = out.stdout.split()
    added = int(added)
    assert float(total) == float(total), "weights read back as NaN"
    assert added < 1.5 * size, f"loading added {added / 1e6:.0f} MB to peak RSS for a {size / 1e6:.0f} MB model"
    assert added > 0.8 * size, f"only {added / 1e6:.0f} MB for a {size / 1e6:.0f} MB model: the weights were not read"


def EngramLM_on_meta_filled(config):
    """A big model built without a second copy in this (parent) process: meta, then empty, then
    a cheap deterministic fill of the tables (the values do not matter here)."""
    from engram import EngramLM

    model = EngramLM(config, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    return model
