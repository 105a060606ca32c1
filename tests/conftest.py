"""Shared test settings: deterministic seeds and hypothesis profiles."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerances the suite states once: float64 results agree with their references to ~1e-10
# relative; float32 to the accumulated round-off of a few hundred products.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
}


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
