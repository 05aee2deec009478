"""Adapter configs: PEFT / AdapterHub field names, presets, the tutorial AdapterConfig, and refusals."""

import json
import math
import os

import pytest
import torch

import adapter_engine as ae
from adapter_engine import AdapterConfig, BottleneckConfig, IA3Config, LoraConfig, Stack
from adapter_engine.config import ACTIVATIONS, coerce_config, config_from_dict

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
    [
        ({"r": 0}, "r must be"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_alpha": "16"}, "lora_alpha must be a finite number, got '16'"),
        ({"lora_alpha": None}, "lora_alpha must be a finite number, got None"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"lora_dropout": "0.1"}, "lora_dropout must be a finite number"),
    ],
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


def _saved_peft_config(tmp_path, **kwargs) -> dict:
    """The adapter_config.json PEFT 0.21 writes for a LoraConfig with ``kwargs``."""
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=4, target_modules=["query", "value"], **kwargs).save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        return json.load(fh)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("alora_invocation_tokens", lambda c: {"alora_invocation_tokens": [5, 6]}),
        ("kasa_config", lambda c: {"kasa_config": c.KasaConfig()}),
        ("velora_config", lambda c: {"velora_config": c.VeloraConfig()}),
        ("monteclora_config", lambda c: {"monteclora_config": c.MontecloraConfig()}),
        ("init_lora_weights='pissa'", lambda c: {"init_lora_weights": "pissa"}),
        ("init_lora_weights='pissa_niter_4'", lambda c: {"init_lora_weights": "pissa_niter_4"}),
        ("init_lora_weights='olora'", lambda c: {"init_lora_weights": "olora"}),
        ("init_lora_weights='corda'", lambda c: {"init_lora_weights": "corda", "corda_config": c.CordaConfig()}),
        ("init_lora_weights='loftq'", lambda c: {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}),
        ("init_lora_weights='lora_ga'", lambda c: {"init_lora_weights": "lora_ga", "lora_ga_config": c.LoraGAConfig()}),
    ],
)
def test_lora_variants_that_change_the_adapter_are_refused(tmp_path, field, kwargs):
    """PEFT LoRA variants whose forward differs, or whose init rewrote the base weights (an adapter saved without
    conversion only fits that modified base), are refused naming the field, not run as plain LoRA."""
    variants = pytest.importorskip("peft.tuners.lora.config")
    saved = _saved_peft_config(tmp_path, **kwargs(variants))
    with pytest.raises(ValueError, match=f"LoraConfig: '?{field.split('=')[0]}'?="):
        LoraConfig.from_dict(saved)


@pytest.mark.parametrize("bad", [{"use_bdlora": {"nblocks": 2}}, {"arrow_config": {"top_k": 2}}])
def test_lora_routing_and_block_diagonal_variants_are_refused(bad):
    with pytest.raises(ValueError, match=f"'{next(iter(bad))}'="):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, **bad})


def test_peft_all_linear_on_fused_moe_experts_is_refused_naming_target_parameters(tmp_path):
    """PEFT 0.21's ``"all-linear"`` on a transformers 5 Mixtral adds the fused experts and the router as
    ``target_parameters``, with an ``alpha_pattern`` of its own for them: the refusal named alpha_pattern, a field
    the user never set, instead of the parameters the engine cannot adapt."""
    peft = pytest.importorskip("peft")
    from transformers import MixtralConfig, MixtralForCausalLM

    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    model = MixtralForCausalLM(MixtralConfig(**sizes, intermediate_size=24, num_local_experts=2))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert pm.peft_config["default"].alpha_pattern  # (what PEFT adds, and what used to be named)
    pm.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as fh:
        saved = json.load(fh)
    with pytest.raises(ValueError, match="LoraConfig: 'target_parameters'=.*mixture-of-experts"):
        LoraConfig.from_dict(saved)


@pytest.mark.parametrize(
    "kwargs",
    [
        lambda c: {"init_lora_weights": "eva", "eva_config": c.EvaConfig()},
        lambda c: {"init_lora_weights": "orthogonal"},
        lambda c: {"init_lora_weights": "gaussian"},
        lambda c: {"init_lora_weights": "mica"},
        lambda c: {"corda_config": c.CordaConfig()},  # ignored by PEFT without init_lora_weights='corda'
        lambda c: {"lora_ga_config": c.LoraGAConfig()},
    ],
)
def test_lora_init_only_options_stay_accepted(tmp_path, kwargs):
    """Initialisations that leave the base weights alone do not change a saved adapter's forward."""
    variants = pytest.importorskip("peft.tuners.lora.config")
    cfg = LoraConfig.from_dict(_saved_peft_config(tmp_path, **kwargs(variants)))
    assert (cfg.r, sorted(cfg.target_modules)) == (4, ["query", "value"])


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


@pytest.mark.parametrize(
    "value, match",
    [(1.5, "dropout must be in"), (-0.1, "dropout must be in"), ("0.1", "must be a finite"), (math.nan, "finite")],
)
def test_bottleneck_dropout_must_be_a_rate(value, match):
    """AdapterHub's adapter ``dropout`` is taken (a rate in [0, 1]); anything else is refused naming the field."""
    assert BottleneckConfig.from_dict({**_adapterhub_config("seq"), "dropout": 0.1}).dropout == 0.1
    with pytest.raises(ValueError, match=match):
        BottleneckConfig(dropout=value)
    with pytest.raises(ValueError, match=match):
        BottleneckConfig.from_dict({**_adapterhub_config("seq"), "dropout": value})


def test_post_add_residual_needs_original_ln_before():
    """AdapterHub sets the "post_add" residual only when original_ln_before adds the sublayer input; without it its
    forward fails (adapters 1.3.0: the residual is never set). Parallel adapters ignore the field, as AdapterHub's."""
    with pytest.raises(ValueError, match="residual_before_ln='post_add' needs original_ln_before=True"):
        BottleneckConfig.double_seq_bn(residual_before_ln="post_add")
    BottleneckConfig.seq_bn(residual_before_ln="post_add")
    BottleneckConfig.par_bn(residual_before_ln="post_add")


@pytest.mark.parametrize("init", ["mam", "lora", "xavier", "BERT", None])
def test_bottleneck_unknown_init_weights_is_refused(init):
    """AdapterHub 1.3.0's BnConfig knows the inits "bert", "mam_adapter" and "houlsby" and refuses any other ("Unknown
    init_weights type"). The engine gave a fresh adapter "bert"'s init for any other value, without a word (and
    wrote "bert" into its saved config)."""
    with pytest.raises(ValueError, match="unknown init_weights"):
        BottleneckConfig.seq_bn(init_weights=init)
    with pytest.raises(ValueError, match="unknown init_weights"):
        BottleneckConfig.from_dict({**_adapterhub_config("seq"), "init_weights": init})
    for known in ("bert", "mam_adapter", "houlsby", "normal"):
        assert BottleneckConfig.seq_bn(init_weights=known).to_dict()["init_weights"] in ("bert", known)


@pytest.mark.parametrize("field, value", [("phm_layer", True), ("use_gating", True), ("inv_adapter", "nice")])
def test_bottleneck_refuses_unimplemented_features(field, value):
    with pytest.raises(ValueError, match=field):
        BottleneckConfig.from_dict({**_adapterhub_config("seq"), field: value})


@pytest.mark.parametrize("act", ["identity", "none", "linear", "IDENTITY"])
def test_to_dict_writes_what_adapterhub_accepts(act):
    """AdapterHub 1.3.0 looks non_linearity up in transformers' ACT2FN (the identity is "linear" there; "identity"
    and "none" raised KeyError) and accepts only a float scaling (an int raised "Unknown scaling type: 2"): an
    adapter the engine saved in AdapterHub format with either could not be loaded there."""
    written = BottleneckConfig.seq_bn(non_linearity=act, scaling=2).to_dict()
    assert written["non_linearity"] == "linear"
    assert written["scaling"] == 2.0 and type(written["scaling"]) is float
    assert BottleneckConfig.from_dict(written) == BottleneckConfig.seq_bn(non_linearity="linear", scaling=2.0)
    assert BottleneckConfig.seq_bn(non_linearity="gelu_new").to_dict()["non_linearity"] == "gelu_new"


def test_activation_names_compute_what_transformers_names_do():
    """AdapterHub builds an adapter's activation with transformers' ``get_activation(non_linearity.lower())``: every
    name the engine accepts that transformers knows computes its function (the GELU spellings ``gelu_python``,
    ``gelu_fast``, ``gelu_accurate``, ``gelu_python_tanh`` were refused: "unknown non_linearity"), within fp32
    rounding, in the eager module and in the kernels' torch twins."""
    from transformers.activations import ACT2FN

    from adapter_engine.bottleneck_adapter import _Activation
    from adapter_engine.kernels.bottleneck_pack import _TORCH_ACTS
    from adapter_engine.kernels.bottleneck_pack import ACTIVATIONS as CODES

    x = torch.linspace(-8, 8, 4001)
    known = [a for a in ACTIVATIONS if a in ACT2FN]
    assert {"gelu_python", "gelu_fast", "gelu_accurate", "gelu_python_tanh", "gelu_new", "swish"} <= set(known)
    for name in known:
        ref = ACT2FN[name](x)
        torch.testing.assert_close(_Activation(name.upper())(x), ref, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(_TORCH_ACTS[CODES[name]](x), ref, rtol=0, atol=1e-6, msg=name)
        assert BottleneckConfig(non_linearity=name).to_dict()["non_linearity"] == name  # AdapterHub's own name


def test_adapterhub_dict_without_original_ln_before_takes_adapterhubs_default():
    """AdapterHub's BnConfig defaults original_ln_before to False (only its seq_bn presets set True) and loads a
    dict without the field Houlsby-style (checked with adapters 1.3.0: the seq fixture without the field gives
    outputs 1.87 away from the full dict's); the engine used to take its own True and run it seq_bn-style."""
    ah = _adapterhub_config("seq")
    assert BottleneckConfig.from_dict(ah).original_ln_before is True
    del ah["original_ln_before"]
    assert BottleneckConfig.from_dict(ah).original_ln_before is False


@pytest.mark.parametrize("field", ["mh_adapter", "output_adapter", "reduction_factor", "non_linearity"])
def test_adapterhub_dict_without_a_required_field_is_refused(field):
    """AdapterHub's BnConfig has no default for these (its loader raises a TypeError): not guessed here either."""
    ah = _adapterhub_config("seq")
    del ah[field]
    with pytest.raises(ValueError, match=field):
        BottleneckConfig.from_dict(ah)


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


def test_a_reduction_factor_over_the_hidden_size_leaves_a_width_of_one():
    """AdapterHub's Adapter raises a width below 1 to 1 (``int(32 // 64)`` is 0): adapters it saved so load, with
    that width, instead of being refused."""
    assert BottleneckConfig(reduction_factor=64).size_for(32, 0) == 1
    assert BottleneckConfig(reduction_factor={"default": 16, "1": 100}).size_for(32, 1) == 1
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


def test_a_lora_dict_without_its_library_type_names_what_to_add():
    """A dict such as ``{"r": 4, "lora_alpha": 8}`` has no ``peft_type`` or ``architecture``: read as AdapterHub's
    bottleneck config, it was refused for missing ``reduction_factor`` and the like, naming none of its own fields.
    The refusal names its PEFT fields and the key to add; with it, it is PEFT's LoRA."""
    fields = r"PEFT \(LoRA / IA3\) fields \['lora_alpha', 'r'\] but no 'peft_type'"
    with pytest.raises(ValueError, match=fields + r".*'peft_type': 'LORA'"):
        coerce_config({"r": 4, "lora_alpha": 8})
    assert coerce_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8}) == LoraConfig(r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="reduction_factor"):  # a bottleneck dict still names its missing fields
        coerce_config({"mh_adapter": False, "output_adapter": True, "non_linearity": "relu"})


def test_an_adapterhub_config_union_names_what_it_joins():
    """AdapterHub's mam preset saves as a ConfigUnion: the refusal names the architectures it joins (it named only
    'union')."""
    mam = {"architecture": "union", "configs": [{"architecture": "prefix_tuning"}, _adapterhub_config("par")]}
    with pytest.raises(ValueError, match=r"union of \['prefix_tuning', 'bottleneck'\].*mam"):
        config_from_dict(mam)
    with pytest.raises(ValueError, match="architecture 'prompt_tuning' is not supported"):
        config_from_dict({"architecture": "prompt_tuning"})


def test_stack():
    assert list(Stack("a", "b")) == ["a", "b"] and Stack(["a", "b"]) == Stack("a", "b") and len(Stack("a")) == 1
    with pytest.raises(TypeError):
        Stack()
    with pytest.raises(TypeError):
        Stack("a", 3)


@pytest.mark.parametrize("init", ["eva", "mica", "orthogonal", "Gaussian", False])
def test_add_adapter_initialises_as_peft_or_refuses_naming_the_init(init):
    """add_adapter with PEFT's init_lora_weights: 'eva' and 'mica' left B random (PEFT: B zero until EVA's
    data-driven init; MiCA's B from the base's SVD, frozen), 'orthogonal' gave plain random factors. Now EVA and MiCA
    are refused before the model changes, 'orthogonal' and 'gaussian' (any case) initialise as PEFT, False is random;
    an unknown name is refused by the config itself."""
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                 vocab_size=32))  # fmt: skip
    config = peft.LoraConfig(r=4, target_modules=["query"], init_lora_weights=init)
    if init in ("eva", "mica"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is not supported by add_adapter"):
            ae.add_adapter(model, "fresh_init", config)
        assert ae.list_adapters(model) == []
        return
    ae.add_adapter(model, "fresh_init", config)
    layer = model.get_submodule("encoder.layer.0.attention.self.query")
    a, b = layer.lora_A["fresh_init"].weight, layer.lora_B["fresh_init"].weight
    if init == "orthogonal":  # PEFT's: A's rows and B's columns come from the even and odd rows of one orthogonal Q
        assert b.abs().max() > 0 and a.abs().max() > 0
        assert abs(float((b @ a).norm())) > 0
    else:
        assert (b.abs().max() == 0) == (init == "Gaussian")
    with pytest.raises(ValueError, match="needs an even r"):
        ae.add_adapter(model, "fresh_odd", peft.LoraConfig(r=3, target_modules=["key"], init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="init_lora_weights='foo' is not a known initialisation"):
        LoraConfig(init_lora_weights="foo")
