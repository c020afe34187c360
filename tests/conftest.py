import os

import pytest
import torch


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed on failure so it can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"test seed: {seed}")
    torch.manual_seed(seed)
    import numpy as np

    return np.random.default_rng(seed)


@pytest.fixture
def tiny_config():
    """The shared tiny ModelConfig, as a factory: tiny_config(M=4, engram=False, moe=True, **fields)."""
    from tests.tiny import small_config

    return small_config


@pytest.fixture
def tiny_model():
    """The shared tiny EngramLM, built and seeded, in eval mode: tiny_model(config, seed=0)."""
    from tests.tiny import build

    return build


def pytest_collection_modifyitems(config, items):
    """Everything under tests/distributed spawns gloo ranks: mark it `distributed`."""
    for item in items:
        if "distributed" in item.path.parts[-2:-1]:
            item.add_marker(pytest.mark.distributed)
