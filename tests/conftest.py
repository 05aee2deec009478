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


@pytest.fixture
def direct_stand_in():
    """``(stand_in, grids)``: ``stand_in(launch, checked)`` is ``launch`` (a ``_backend.DirectLaunch`` that checks
    the alignment of ``checked`` tensors) with a stand-in for its compiled kernel, recorded with every checked tensor
    16-byte aligned. The stand-in binds the flat argument list of a direct call back to the kernel's parameter names
    and launches the kernel in the interpreter, so a misordered or missing argument gives wrong results; ``grids``
    lists the grids it was called with."""
    make, grids = _stand_in_maker()

    def stand_in(launch, checked: int):
        options = {k: v for k, v in launch.kwargs.items() if k not in launch.kernel.arg_names}
        return launch._replace(compiled=make(launch.kernel, options), alignment=(True,) * checked)

    return stand_in, grids


@pytest.fixture
def compiled_stand_in():
    """``(make, grids)``: ``make(kernel)`` is a stand-in for ``kernel``'s compiled form (what a GPU's first launch
    returns, ``_backend.compiled_kernel``), binding a direct call's flat arguments back to the kernel's parameter
    names and launching it in the interpreter; ``grids`` lists the grids it was called with."""
    return _stand_in_maker()


def _stand_in_maker():
    from adapter_engine.kernels._backend import INTERPRET

    if not INTERPRET:
        pytest.skip("the stand-in launches the kernel in the interpreter")
    grids = []

    def make(kernel, options=None):
        class CompiledStandIn:
            def __getitem__(self, grid):
                grid = (grid[0], grid[1], grid[2])  # as Triton's CompiledKernel reads it: all three dimensions

                def run(*flat):
                    assert len(flat) == len(kernel.arg_names)
                    grids.append(grid)
                    kernel[grid](**dict(zip(kernel.arg_names, flat, strict=True)), **(options or {}))

                return run

        return CompiledStandIn()

    return make, grids
