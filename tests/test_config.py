"""Adapter configs: PEFT / AdapterHub field names, presets, the tutorial AdapterConfig, and refusals."""

import json
import math
import os

import pytest

from adapter_engine import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig, Stack
from adapter_engine.config import coerce_config, config_from_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub", "tiny_bert")


def _adapterhub_config(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "adapter_config.json")) as fh:
        return json.load(fh)["config"]


def test_lora_scaling_and_peft_names():
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules={"value", "query"})
    assert cfg.scaling == 2.0
    assert cfg.target_modules == ["query", "value"]
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "r must be"), ({"lora_dropout": 1.0}, "lora_dropout"), ({"bias": "all"}, "bias='all'")],
)
def test_lora_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_lora_from_real_peft_config():
    peft = pytest.importorskip("peft")
    pc = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value"], lora_dropout=0.05)
    cfg = coerce_config(pc)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (4, 12, 0.05, ["query", "value"])
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig.from_dict({**json.loads(json.dumps(pc.to_dict(), default=str)), "use_dora": True})
    # PEFT adds fields every release: unknown ones are ignored, a round trip through to_dict is stable
    assert LoraConfig.from_dict({**cfg.to_dict(), "some_future_field": 1}) == cfg


def test_peft_type_dispatch():
    assert isinstance(config_from_dict({"peft_type": "IA3", "target_modules": ["k"]}), IA3Config)
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        config_from_dict({"peft_type": "PREFIX_TUNING"})


@pytest.mark.parametrize(
    "saved, preset",
    [("seq", BottleneckConfig.seq_bn), ("houlsby", BottleneckConfig.double_seq_bn), ("par", BottleneckConfig.par_bn)],
)
def test_presets_match_what_adapterhub_saved(saved, preset):
    ah = _adapterhub_config(saved)
    cfg = BottleneckConfig.from_dict(ah)
    assert cfg == preset(reduction_factor=ah["reduction_factor"])
    written = cfg.to_dict()
    assert set(written) == set(ah), "to_dict must write the same field set as adapters 1.3.0"
    assert {k: written[k] for k in ah if k != "init_weights_seed"} == {k: ah[k] for k in ah if k != "init_weights_seed"}


def test_bottleneck_sizes_and_activations():
    cfg = BottleneckConfig(reduction_factor={"default": 16, "1": 4})
    assert (cfg.size_for(768, 0), cfg.size_for(768, 1)) == (48, 192)
    with pytest.raises(ValueError, match="unknown non_linearity 'mish'"):
        BottleneckConfig(non_linearity="mish")
    with pytest.raises(ValueError, match="no entry for layer 3"):
        BottleneckConfig(reduction_factor={"1": 4}).size_for(32, 3)
    with pytest.raises(ValueError, match="mh_adapter / output_adapter"):
        BottleneckConfig(mh_adapter=False, output_adapter=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction_factor": 0}, "reduction_factor must be"),
        ({"reduction_factor": -4}, "reduction_factor must be"),
        ({"reduction_factor": "16"}, "reduction_factor must be"),
        ({"reduction_factor": True}, "reduction_factor must be"),
        ({"reduction_factor": math.inf}, "reduction_factor must be"),
        ({"reduction_factor": {"default": 16, "1": 0}}, r"reduction_factor\['1'\] must be"),
        ({"bottleneck_size": "8"}, "bottleneck_size must be"),
        ({"bottleneck_size": 0}, "bottleneck_size must be"),
    ],
)
def test_bottleneck_refuses_bad_widths_at_construction(kwargs, match):
    """A width field that could never give a width (0, negative, not a number) is refused naming the field, not
    met later as a ZeroDivisionError when the adapter is added."""
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        BottleneckConfig.from_dict({**_adapterhub_config("seq"), **kwargs})


@pytest.mark.parametrize("field, value", [("phm_layer", True), ("use_gating", True), ("inv_adapter", "nice")])
def test_bottleneck_refuses_unimplemented_features(field, value):
    with pytest.raises(ValueError, match=field):
        BottleneckConfig.from_dict({**_adapterhub_config("seq"), field: value})


def test_tutorial_adapter_config():
    cfg = AdapterConfig(hidden_size=768, adapter_size=64, adapter_act="relu", adapter_initializer_range=1e-4)
    bn = coerce_config(cfg)
    assert isinstance(bn, BottleneckConfig)
    assert (bn.size_for(768, 0), bn.non_linearity, bn.init_range, bn.mh_adapter, bn.output_adapter) == (
        64,
        "relu",
        1e-4,
        True,
        True,
    )
    assert AdapterConfig(hidden_size=100, adapter_size=3).to_bottleneck().size_for(100, 0) == 3  # 100 // (100/3) is 2
    with pytest.raises(ValueError, match="adapter_act"):
        AdapterConfig(hidden_size=8, adapter_size=2, adapter_act="swoosh")


def test_coerce_presets_and_dicts():
    assert coerce_config("houlsby") == BottleneckConfig.double_seq_bn()
    assert coerce_config("lora") == LoraConfig()
    assert coerce_config({"config": _adapterhub_config("par")}).is_parallel
    assert coerce_config(_adapterhub_config("lora")).lora_alpha == 8
    with pytest.raises(ValueError, match="unknown adapter config name"):
        coerce_config("prefix_tuning")
    with pytest.raises(TypeError):
        coerce_config(42)


def test_stack():
    assert list(Stack("a", "b")) == ["a", "b"] and Stack(["a", "b"]) == Stack("a", "b") and len(Stack("a")) == 1
    with pytest.raises(TypeError):
        Stack()
    with pytest.raises(TypeError):
        Stack("a", 3)
