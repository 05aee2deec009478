"""Test tiers: the CPU tier runs every Triton kernel in the interpreter; the CUDA tier (``-m cuda``) runs
when a GPU is present and is skipped otherwise."""

import os

# Must be set before the first kernel module is imported: @triton.jit decides at decoration time.
if not os.environ.get("ADAPTER_ENGINE_NO_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA tier: no GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fused_training(monkeypatch):
    """Bottleneck stacks that train run the fused kernels (forward and backward), not the eager modules that the
    default dispatch picks for training (``adapter_engine.bottleneck.TRAIN_FUSED``): for the files that check the
    fused backward through the patched models."""
    import adapter_engine.bottleneck

    monkeypatch.setattr(adapter_engine.bottleneck, "TRAIN_FUSED", True)
