"""Every test starts from the same global RNG state, so a test's random inputs do not depend on
which tests pytest-xdist ran before it on the same worker."""
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_global_rng():
    torch.manual_seed(0)
