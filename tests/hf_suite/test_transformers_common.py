"""transformers' own common model tests on EngramForCausalLM: `ModelTesterMixin` and
`ConfigTester` from the transformers 5.24.0 source distribution, on four variants (dense and
MoE, M = 1 and 2).

The test files are not in this repository. They are read at test time from
`$TRANSFORMERS_TESTS_DIR` (the `tests/` folder of a transformers 5.24.0 checkout or source
distribution), or from a copy unpacked once into `~/.cache/engram-torch/` from the package
index's source distribution (`pip download --no-binary :all: transformers==5.24.0`). Without
either, every test here is skipped with a message that says so.

The source distribution ships `tests/test_modeling_common.py` but not the two modules it
imports, `tests/generation/test_utils.py` (`GenerationTesterMixin`) and
`tests/exporters/test_export.py` (`ExportTesterMixin`). When they are missing they are replaced
by empty mixins, so those two suites run only from a full checkout (TRANSFORMERS_TESTS_DIR);
tests/unit/test_hf_api.py covers assisted decoding, caching and torch.export on our side.

Run in CI (about 25 s with the download); alone: `pytest tests/hf_suite`.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram.config import EngramConfig, ModelConfig, MoEConfig  # noqa: E402
from engram.hf import EngramForCausalLM, EngramLMConfig  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM_NAMES  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.hf_suite]

VERSION = "5.24.0"
PACKAGE = "transformers_common_tests"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "engram-torch" / f"transformers-{VERSION}-tests"


def locate_suite() -> tuple[Path | None, str]:
    """(the folder holding test_modeling_common.py, or None; where it is, or why not)."""
    given = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if given:
        path = Path(given)
        if not (path / "test_modeling_common.py").is_file():
            return None, f"TRANSFORMERS_TESTS_DIR={given} has no test_modeling_common.py"
        return path, f"TRANSFORMERS_TESTS_DIR={given}"
    if (CACHE / "test_modeling_common.py").is_file():
        return CACHE, str(CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                                   "--no-build-isolation", f"transformers=={VERSION}", "-d", tmp],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return None, f"pip download transformers=={VERSION} timed out"
        archives = list(Path(tmp).glob(f"transformers-{VERSION}.tar.gz"))
        if done.returncode or not archives:
            return None, (f"the transformers {VERSION} source distribution is not available offline "
                          f"(pip download: {done.stderr.strip().splitlines()[-1:] or done.returncode})")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=CACHE.parent))
        with tarfile.open(archives[0]) as tar:
            prefix = f"transformers-{VERSION}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staged, members=members, filter="data")
        if CACHE.exists():  # another run unpacked it meanwhile
            shutil.rmtree(staged)
        else:
            os.replace(staged, CACHE)
    return CACHE, f"{CACHE} (from the source distribution)"


# Modules test_modeling_common / test_configuration_common import that the source
# distribution does not ship, and the names taken from them.
MAYBE_MISSING = {"exporters.test_export": ["ExportTesterMixin"], "generation.test_utils": ["GenerationTesterMixin"],
                 "utils.test_configuration_utils": ["config_common_kwargs"]}


class Missing:
    """A value from a module the source distribution lacks: a test that uses it is skipped."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _skip(self, *args, **kwargs):
        raise unittest.SkipTest(f"{self._name} is not in transformers' source distribution "
                                "(set TRANSFORMERS_TESTS_DIR to a full checkout's tests/)")

    __deepcopy__ = __iter__ = __getitem__ = __len__ = items = keys = _skip


def import_suite():
    """((ModelTesterMixin, GenerationTesterMixin, ConfigTester, ids_tensor), None), or (None, why not)."""
    if transformers.__version__ != VERSION:
        return None, f"these are transformers {VERSION}'s tests; {transformers.__version__} is installed"
    folder, origin = locate_suite()
    if folder is None:
        return None, origin
    pytest.importorskip("parameterized", reason="transformers' common tests need `pip install parameterized`")
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
    for module, names in MAYBE_MISSING.items():
        if not (folder / (module.replace(".", "/") + ".py")).is_file():
            parent = f"{PACKAGE}.{module.split('.')[0]}"
            sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
            stub = types.ModuleType(f"{PACKAGE}.{module}")
            for name in names:  # mixins: empty classes; values: anything that uses them skips
                setattr(stub, name, type(name, (), {}) if name.endswith("Mixin") else Missing(f"{module}.{name}"))
            sys.modules[stub.__name__] = stub
    # test_configuration_common imports transformers through tests/__init__.py, which the
    # source distribution lacks: that import yields the installed transformers anyway
    import transformers.utils as utils

    direct = utils.direct_transformers_import
    utils.direct_transformers_import = lambda path, file="__init__.py": (
        direct(path, file) if (Path(path) / file).is_file() else transformers)
    try:
        common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        config_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    finally:
        utils.direct_transformers_import = direct
    generation = sys.modules[f"{PACKAGE}.generation.test_utils"]
    return (common.ModelTesterMixin, generation.GenerationTesterMixin, config_common.ConfigTester,
            common.ids_tensor), None


SUITE, SKIP = import_suite()

# Failures left, each impossible by design; the test names are transformers'.
BY_DESIGN = {
    "test_inputs_embeds": "Engram hashes the token ids: inputs_embeds alone cannot be looked up (a clear error)",
    "test_resize_tokens_embeddings": "it builds a model with vocab_size=4 under an Engram config whose compressed "
                                     "vocabulary has 99 ids; the model refuses that contradiction by name (its "
                                     "other resizes pass, and tests/unit/test_hf_api.py resizes with the table)",
}


class EngramModelTester:
    """Llama-tester-shaped: a small EngramLM with Engram at blocks 0 and 1."""

    def __init__(self, parent, *, M: int, moe: bool, batch_size=2, seq_length=7, vocab_size=99):
        self.parent, self.M, self.moe = parent, M, moe
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.is_training = True

    def get_config(self) -> EngramLMConfig:
        c = ModelConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads, n_kv_heads=2, mlp_hidden_size=37, n_streams=self.M, max_seq_len=64,
            moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=16, first_k_dense=1)
            if self.moe else None,
            engram=EngramConfig(compressed_vocab_size=self.vocab_size, pad_id=0, layer_ids=(0, 1),
                                rows_per_head=(31, 37), n_head_per_ngram=2, n_embed_per_ngram=8,
                                table_init_std=1.0))
        return EngramLMConfig(engram_model=c.to_dict(), pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def prepare_config_and_inputs_for_common(self):
        ids = SUITE[3]([self.batch_size, self.seq_length], self.vocab_size)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # one left-padded row
        return self.get_config(), {"input_ids": ids, "attention_mask": mask}


def make_case(M: int, moe: bool):
    ModelTesterMixin, GenerationTesterMixin, ConfigTester, *_ = SUITE

    class Case(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = (EngramForCausalLM,)
        has_attentions = False  # fused attention: output_attentions is refused (test_hf_api.py)
        test_all_params_have_gradient = not moe  # routed experts a batch does not pick get no gradient
        test_can_init_all_missing_weights_before_2023 = True  # (the suite dates models by their copyright line)

        def setUp(self):
            self.model_tester = EngramModelTester(self, M=M, moe=moe)
            self.config_tester = ConfigTester(self, config_class=EngramLMConfig,
                                              engram_model=self.model_tester.get_config().engram_model)

        @classmethod
        def setUpClass(cls):
            """Name our class among transformers' causal LMs, as an in-tree model is: the suite
            keys its causal-LM checks (labels, shift_labels) on that static mapping."""
            super().setUpClass()
            CAUSAL_LM_NAMES[EngramLMConfig.model_type] = EngramForCausalLM.__name__

        @classmethod
        def tearDownClass(cls):
            CAUSAL_LM_NAMES.pop(EngramLMConfig.model_type, None)
            super().tearDownClass()

        def test_config(self):
            self.config_tester.run_common_tests()

        def _callTestMethod(self, method):
            reason = BY_DESIGN.get(self._testMethodName)
            if reason:
                pytest.xfail(reason)
            return super()._callTestMethod(method)

    Case.__name__ = Case.__qualname__ = f"TestEngram{'MoE' if moe else 'Dense'}M{M}"
    return Case


if SUITE is None:
    def test_transformers_common_suite_is_available():
        pytest.skip(f"transformers' common tests not found: {SKIP}. Set TRANSFORMERS_TESTS_DIR to the tests/ "
                    f"folder of transformers {VERSION}, or allow `pip download` from the package index once")
else:
    for _M in (1, 2):
        for _moe in (False, True):
            globals()[make_case(_M, _moe).__name__] = make_case(_M, _moe)
