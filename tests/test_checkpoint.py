"""Out-of-core merge of a sharded safetensors checkpoint (adapter_engine.checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from adapter_engine.checkpoint import merge_checkpoint

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99)


@pytest.fixture()
def bert_and_lora(tmp_path):
    """A sharded tiny BERT checkpoint and a PEFT LoRA (non-zero B) saved next to it."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY_BERT)).eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir, max_shard_size="30KB")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"], init_lora_weights=False)
    )
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model


def _inputs():
    return {"input_ids": torch.tensor([[5, 17, 42, 8, 91, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


def test_streamed_merge_loads_in_plain_transformers_with_the_merged_outputs(bert_and_lora, tmp_path):
    from transformers import BertModel

    base_dir, adapter_dir, peft_model = bert_and_lora
    assert (base_dir / "model.safetensors.index.json").exists()  # the base is really sharded
    out_dir = tmp_path / "merged"
    summary = merge_checkpoint(base_dir, adapter_dir, out_dir, progress=False)
    assert summary["merged"] == 2 * 4 and summary["shards"] > 1  # query, value, attention + FFN output dense
    with torch.no_grad():
        expected = peft_model(**_inputs()).last_hidden_state
        reloaded = BertModel.from_pretrained(out_dir).eval()
        got = reloaded(**_inputs()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    index_in = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    index_out = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert index_in == index_out
    assert (out_dir / "config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_streamed_ia3_merge_scales_the_bias_of_non_feedforward_modules(tmp_path):
    """IA3 on a non-feed-forward module scales the output, y = (x W^T + b) * l, so its bias is scaled too (PEFT's
    merge and merge_adapter do). Random HF models have zero biases, which hides a missing bias scale: randomise."""
    from peft import IA3Config, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY_BERT)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    cfg = IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    peft_model = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(adapter_dir)
    summary = merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert summary["merged"] == 2 * (4 + 2)  # key, value and both output.dense weights; key and value biases
    reloaded = BertModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = peft_model(**_inputs()).last_hidden_state
        got = reloaded(**_inputs()).last_hidden_state
        merged = peft_model.merge_and_unload().state_dict()
    for key in ("encoder.layer.0.attention.self.value.bias", "encoder.layer.1.output.dense.bias"):
        torch.testing.assert_close(reloaded.state_dict()[key], merged[key], rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_ia3_merge_marks_feedforward_layers_by_plain_suffixes_as_peft(tmp_path):
    """PEFT marks an IA3 layer feed-forward when its name ends with a ``feedforward_modules`` entry, no dot needed
    (``["_proj"]`` marks q_proj and o_proj); load_adapter follows it, merge_checkpoint kept the dotted rule: the square
    q_proj / o_proj vectors scaled their outputs instead of their inputs, a silently wrong checkpoint (0.08 off PEFT's
    merge on the tiny Llama). It now writes PEFT's merged weights exactly."""
    from peft import IA3Config, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    base = LlamaModel(conf).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = IA3Config(target_modules=r".*\.(q_proj|o_proj)", feedforward_modules=["_proj"], init_ia3_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", device="cpu", progress=False)
    merged = LlamaModel.from_pretrained(tmp_path / "merged").state_dict()
    for key, value in peft_model.merge_and_unload().state_dict().items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("saved_flag", [None, False])
def test_streamed_merge_of_gpt2_conv1d_knows_the_layout(tmp_path, saved_flag):
    """GPT-2's Conv1D weights are stored (in, out). The engine saves fan_in_fan_out=True for them (as PEFT wants),
    and merge_checkpoint takes the layout from the checkpoint's architecture, not from the flag (an adapter saved
    with the flag False, or an AdapterHub one, which never has it): a square c_proj shows a wrong transpose."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import adapter_engine as ae

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    model = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    ae.add_adapter(model, "a", ae.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    ae.save_adapter(model, "a", adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    assert json.loads(config_path.read_text())["fan_in_fan_out"] is True
    if saved_flag is not None:
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"fan_in_fan_out": saved_flag}))
    ae.merge_adapter(model, "a")
    merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").state_dict()
    for key in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.attn.c_attn.weight"):
        assert not torch.equal(merged[key], base.state_dict()[key])
        torch.testing.assert_close(merged[key], model.state_dict()[key], rtol=1e-6, atol=1e-6)


def test_streamed_merge_into_fp16_weights_rounds_once_from_the_fp32_factors(tmp_path):
    """An fp16 checkpoint and a PEFT LoRA with fp32 factors: each merged weight is within half an ulp of the fp64
    result ``W + s B A`` (PEFT's merge adds the fp32 delta to the fp16 weight: one rounding). Rounding the factors
    to fp16 first rounds twice: where ``s B A`` cancels ``W`` that was off by hundreds of ulps."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    adapter_dir.mkdir()
    key = "encoder.layer.0.attention.self.query"
    weight = torch.randn(32, 24).half()
    a, b = torch.randn(4, 24) * 0.5, torch.randn(32, 4) * 0.5
    save_file({f"{key}.weight": weight, f"{key}.bias": torch.randn(32).half()}, base_dir / "model.safetensors")
    save_file({f"base_model.model.{key}.lora_A.weight": a, f"base_model.model.{key}.lora_B.weight": b},
              adapter_dir / "adapter_model.safetensors")  # fmt: skip
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]})
    )
    merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")[f"{key}.weight"]
    assert merged.dtype == torch.float16
    exact = weight.double() + 2.0 * (b.double() @ a.double())
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-14))) - 10)  # fp16: 10 fraction bits
    assert ((merged.double() - exact).abs() / ulp).max() <= 0.5


def test_failure_midway_leaves_no_output(bert_and_lora, tmp_path, monkeypatch):
    from adapter_engine import checkpoint

    base_dir, adapter_dir, _ = bert_and_lora
    calls = {"n": 0}
    real = checkpoint._merge_tensor_

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure at the third merged tensor")
        return real(*args)

    monkeypatch.setattr(checkpoint, "_merge_tensor_", failing)
    with pytest.raises(RuntimeError, match="injected"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from adapter_engine import checkpoint
    real = checkpoint._write_tensor
    count = [0]
    def slow_write(fh, tensor):
        real(fh, tensor)
        count[0] += 1
        if count[0] == 5:
            print("WRITING", flush=True)
            time.sleep(60)
    checkpoint._write_tensor = slow_write
    checkpoint.merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True, progress=False)
    """
)


@pytest.mark.parametrize("existing", [False, True])
def test_killed_process_leaves_previous_state(bert_and_lora, tmp_path, existing):
    base_dir, adapter_dir, _ = bert_and_lora
    out_dir = tmp_path / "merged"
    if existing:
        merge_checkpoint(base_dir, adapter_dir, out_dir, progress=False)
        before = {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)}
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(base_dir), str(adapter_dir), str(out_dir)],
        stdout=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    if existing:
        assert {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)} == before
    else:
        assert not out_dir.exists()


def test_bad_inputs_name_the_problem(bert_and_lora, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    base_dir, adapter_dir, _ = bert_and_lora
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_checkpoint(tmp_path / "nope", adapter_dir, tmp_path / "out", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "exists", progress=False)
    # An adapter made for a model with another hidden size.
    wide = BertModel(BertConfig(**{**TINY_BERT, "hidden_size": 48, "intermediate_size": 64}))
    wrong_dir = tmp_path / "wrong"
    get_peft_model(wide, LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)).save_pretrained(wrong_dir)
    with pytest.raises(ValueError, match=r"weight \(32, 32\) does not fit lora_A \(2, 48\)"):
        merge_checkpoint(base_dir, wrong_dir, tmp_path / "out", progress=False)
    # An adapter of another architecture: every module it adapts is named, with no advice about tied lm_heads (the
    # first such module was named, with advice to merge it in memory as for a tied lm_head, which merge refuses too).
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    config = LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(gpt2, config).save_pretrained(tmp_path / "gpt2_lora")
    with pytest.raises(ValueError, match=r"\[.h.0.attn.c_attn., .*\] \(and 2 more\) match no weight") as err:
        merge_checkpoint(base_dir, tmp_path / "gpt2_lora", tmp_path / "out", progress=False)
    assert "another architecture" in str(err.value) and "tie_word_embeddings" not in str(err.value)
    # A truncated shard.
    shard = sorted(p for p in os.listdir(base_dir) if p.endswith(".safetensors"))[0]
    data = (base_dir / shard).read_bytes()
    (base_dir / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bottleneck_adapter_is_refused_naming_the_in_memory_merge(bert_and_lora, tmp_path):
    """A bottleneck adapter was refused as one "whose nonlinearity cannot be folded (use absorb=True in
    merge_adapter)", even one with the identity activation, which merge_adapter folds: the refusal now names the
    in-memory merge (and the command's) for any bottleneck adapter, and nothing is written."""
    from transformers import BertConfig, BertModel

    import adapter_engine as ae

    base_dir, _, _ = bert_and_lora
    model = BertModel(BertConfig(**TINY_BERT))
    ae.add_adapter(
        model, "bn_fold", ae.BottleneckConfig.double_seq_bn(non_linearity="identity", original_ln_before=False)
    )
    ae.save_adapter(model, "bn_fold", tmp_path / "bn", format="adapterhub")
    with pytest.raises(ValueError, match=r"holds a bottleneck adapter: .*merge_adapter, or with adapter-engine merge"):
        merge_checkpoint(base_dir, tmp_path / "bn", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_lora_factors_of_another_rank_than_the_config_are_refused(bert_and_lora, tmp_path):
    """A PEFT adapter whose config says r=8 over rank-4 factors (edited or mixed-up files): load_adapter and PEFT refuse
    it, merge_checkpoint merged it with the scaling lora_alpha / 8, half the trained update, without a word. Refused
    now, naming the module, the shapes and r; nothing is written."""
    import shutil

    base_dir, adapter_dir, _ = bert_and_lora
    edited = tmp_path / "edited"
    shutil.copytree(adapter_dir, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"lora_A \(4, 32\) and lora_B \(32, 4\) are not of the config's rank r=8"):
        merge_checkpoint(base_dir, edited, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_weights_of_layers_the_config_does_not_select_are_refused(bert_and_lora, tmp_path):
    """A PEFT file with weights for a layer its config's target_modules leaves out (an edited config): PEFT ignores
    them and load_adapter refuses them, but merge_checkpoint merged them without a word. Refused now, naming the
    layers; nothing is written."""
    import shutil

    base_dir, adapter_dir, _ = bert_and_lora
    edited = tmp_path / "edited"
    shutil.copytree(adapter_dir, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query", "value"]}))
    with pytest.raises(ValueError, match=r"does not select: .*'encoder\.layer\.0\.attention\.output\.dense'"):
        merge_checkpoint(base_dir, edited, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("missing shard", FileNotFoundError, r"index\.json' lists shards that are missing: \['model-00002-of-"),
        ("index not json", ValueError, r"corrupted checkpoint index .*index\.json.*weight_map"),
        ("index without weight_map", ValueError, r"corrupted checkpoint index .*index\.json.*weight_map"),
        ("shape of a header entry", ValueError, r"corrupted safetensors header in .*model-00001-of-.*'embeddings\."),
    ],
)
def test_a_damaged_index_or_shard_header_is_named_and_nothing_is_written(bert_and_lora, tmp_path, damage, error, match):
    """Each problem names the file (before: a bare JSONDecodeError, KeyError or reshape RuntimeError)."""
    base_dir, adapter_dir, _ = bert_and_lora
    index = base_dir / "model.safetensors.index.json"
    shards = sorted(p for p in os.listdir(base_dir) if p.endswith(".safetensors"))
    if damage == "missing shard":
        os.remove(base_dir / shards[1])
    elif damage == "index not json":
        index.write_text("{not json")
    elif damage == "index without weight_map":
        index.write_text(json.dumps({"metadata": {}}))
    else:  # a shape the tensor's byte span does not hold, the header's length unchanged
        data = (base_dir / shards[0]).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + n].decode()
        damaged = header.replace('"shape":[512,32]', '"shape":[512,31]', 1)
        assert damaged != header
        (base_dir / shards[0]).write_bytes(data[:8] + damaged.encode() + data[8 + n :])
    with pytest.raises(error, match=match):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_an_unusable_device_is_named_before_anything_is_read(bert_and_lora, tmp_path):
    """(On a machine without that GPU it failed in the pinned buffer's allocation, about pinned memory.)"""
    base_dir, adapter_dir, _ = bert_and_lora
    with pytest.raises(ValueError, match="device 'cuda:99' is not usable here"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", device="cuda:99", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge-checkpoint", "merge"])
def test_merged_sentence_transformers_folder_keeps_its_module_folders(bert_and_lora, tmp_path, command):
    """all-MiniLM-L6-v2 (the demo's model) is a sentence-transformers folder: modules.json names 1_Pooling (its own
    config) and 2_Normalize. Both merges copied modules.json but not the folders, so SentenceTransformer could not
    load the output (Pooling without its config); the folders modules.json names are copied now."""
    from adapter_engine.cli import main

    base_dir, adapter_dir, _ = bert_and_lora
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
               {"idx": 3, "name": "3", "path": "../outside", "type": "sentence_transformers.models.Dense"}]  # fmt: skip
    (base_dir / "modules.json").write_text(json.dumps(modules))
    (base_dir / "1_Pooling").mkdir()
    (base_dir / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32}))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not part of the model")
    out = tmp_path / "out"
    assert main([command, "--model", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert (out / "modules.json").exists()
    assert (out / "1_Pooling" / "config.json").read_text() == (base_dir / "1_Pooling" / "config.json").read_text()
    assert not (out / "2_Normalize").exists() and not (out / "outside").exists()  # (none in the base; outside it)


def test_a_lora_for_a_weight_that_is_not_a_matrix_names_the_shapes(tmp_path):
    """An adapter module whose checkpoint weight is 1-D (a LayerNorm of another architecture): it failed with
    "not enough values to unpack"."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    adapter_dir.mkdir()
    save_file({"blocks.0.norm.weight": torch.randn(8)}, base_dir / "model.safetensors")
    save_file({"base_model.model.blocks.0.norm.lora_A.weight": torch.randn(2, 8),
               "base_model.model.blocks.0.norm.lora_B.weight": torch.randn(8, 2)},
              adapter_dir / "adapter_model.safetensors")  # fmt: skip
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["norm"]})
    )
    with pytest.raises(ValueError, match=r"blocks\.0\.norm\.weight: weight \(8,\) does not fit lora_A \(2, 8\)"):
        merge_checkpoint(base_dir, adapter_dir, tmp_path / "out", progress=False)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from adapter_engine.checkpoint import merge_checkpoint
    from adapter_engine.formats import read_adapter

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    import torch
    from adapter_engine.kernels import merge_lora_
    read_adapter(sys.argv[2])  # warm the imports on the adapter path
    # and the BLAS library, whose per-thread buffers are allocated by the first matrix product (a fixed cost)
    merge_lora_(torch.randn(64, 64), torch.randn(8, 64), torch.randn(64, 8), 1.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak resident size (VmHWM)
    start = status("VmRSS:")
    summary = merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
    print(json.dumps({"peak_growth": status("VmHWM:") - start, **summary}))
    """
)


def test_streamed_merge_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Peak host memory growth < 1.5 x the largest tensor + a 16 MiB buffer, on a checkpoint 10x that bound."""
    largest = 8 * 2**20
    bound = 1.5 * largest + 16 * 2**20
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    n_layers, side = 36, 1448  # 36 fp32 weights of 1448 x 1448 (8.0 MiB each): 288 MiB in all
    weight_map = {}
    for shard in range(6):
        names = [f"layers.{i}.proj.weight" for i in range(shard * 6, shard * 6 + 6)]
        save_file({n: torch.randn(side, side) for n in names}, base_dir / f"model-{shard:05d}-of-00006.safetensors")
        weight_map.update({n: f"model-{shard:05d}-of-00006.safetensors" for n in names})
    (base_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert n_layers * side * side * 4 >= 10 * bound
    adapter_dir.mkdir()
    lora = {}
    for i in range(0, n_layers, 3):  # a LoRA on every third layer
        lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, side) * 0.01
        lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(side, 8) * 0.01
    save_file(lora, adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["proj"]})
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(base_dir), str(adapter_dir), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["merged"] == 12 and result["largest_tensor_bytes"] == side * side * 4
    print(
        f"peak host growth {result['peak_growth'] / 2**20:.1f} MiB for a {result['bytes'] / 2**20:.0f} MiB checkpoint"
    )
    assert result["peak_growth"] < bound, (result, time.perf_counter() - t0)


def test_cli_merge_checkpoint(bert_and_lora, tmp_path, capsys, caplog):
    """The CLI prints its summary once: the INFO logging it turns on printed the library's copy of it too."""
    from adapter_engine.cli import main

    base_dir, adapter_dir, _ = bert_and_lora
    with caplog.at_level("INFO", logger="adapter_engine"):
        assert main(["merge-checkpoint", "--model", str(base_dir), "--adapter", str(adapter_dir), "--out",
                     str(tmp_path / "cli")]) == 0  # fmt: skip
    assert "merged 8 of" in capsys.readouterr().out
    assert not [r for r in caplog.records if r.levelname == "INFO" and "merged" in r.getMessage()]
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()


def test_streamed_merge_of_a_peft_lora_on_lm_head(tmp_path):
    """PEFT saves a targeted lm_head's own weight beside its factors: the streamed merge checks that copy against
    the checkpoint's (refused before writing anything when it differs) and merges as PEFT does. A tied lm_head has
    no weight in the checkpoint: refused with the reason and what to do instead."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(tied):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                            tie_word_embeddings=tied)).eval()  # fmt: skip

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_models = {}
    for tied in (False, True):
        llama(tied).save_pretrained(tmp_path / f"base{tied}")
        torch.manual_seed(1)
        peft_models[tied] = get_peft_model(llama(tied), lora)
        peft_models[tied].save_pretrained(tmp_path / f"adapter{tied}")
    with pytest.raises(
        ValueError, match=r"\[.lm_head.\] match no weight.*tie_word_embeddings.*keep such an adapter unmerged"
    ):
        merge_checkpoint(tmp_path / "baseTrue", tmp_path / "adapterTrue", tmp_path / "tied", progress=False)
    ids = torch.tensor([[3, 17, 42, 8, 91, 5]])
    merge_checkpoint(tmp_path / "baseFalse", tmp_path / "adapterFalse", tmp_path / "merged", progress=False)
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        expected = peft_models[False].merge_and_unload().eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    adapter_file = tmp_path / "adapterFalse" / "adapter_model.safetensors"
    tensors = load_file(adapter_file)
    tensors["base_model.model.lm_head.base_layer.weight"][3, 5] += 0.5
    save_file(tensors, adapter_file)
    with pytest.raises(ValueError, match=r"own copy of lm_head\.weight .* differs"):
        merge_checkpoint(tmp_path / "baseFalse", tmp_path / "adapterFalse", tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists() and not (tmp_path / "tied").exists()


def test_streamed_merge_of_a_peft_ia3_on_lm_head(tmp_path):
    """IA3 on lm_head: PEFT saves lm_head's weight beside the vector too; the streamed merge found that copy's
    checkpoint key among LoRA updates only, so it refused the file as "a resized vocabulary"."""
    from peft import IA3Config, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=99, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), IA3Config(
        target_modules=["v_proj", "lm_head"], feedforward_modules=[])).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    ids = torch.tensor([[3, 17, 42, 8, 91, 5]])
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        expected = peft_model.merge_and_unload().eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_merge_of_a_task_model_lora_into_a_base_model_checkpoint(tmp_path):
    """A LoRA trained on BertForSequenceClassification (modules ``bert.encoder...``, as the demo trains on
    all-MiniLM-L6-v2) into a checkpoint saved from BertModel (keys ``encoder...``, as all-MiniLM-L6-v2's): it was
    refused as "matches no weight"; the architecture's base_model_prefix now maps one onto the other."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    task_model = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(task_model, lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    summary = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert summary["merged"] == 2 * 2
    with torch.no_grad():
        expected = peft_model.merge_and_unload().bert(**_inputs()).last_hidden_state
        got = BertModel.from_pretrained(tmp_path / "merged").eval()(**_inputs()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_streamed_merge_takes_each_layers_rank_and_alpha_from_the_patterns(tmp_path):
    """A PEFT LoRA with rank_pattern / alpha_pattern / layers_to_transform: each layer merges with its own r and
    alpha (the merge used the config's default scaling for every layer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**TINY_BERT)).eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[1],
                        rank_pattern={"value": 2}, alpha_pattern={"query": 3}, init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(adapter_dir)
    summary = merge_checkpoint(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert summary["merged"] == 2
    with torch.no_grad():
        expected = peft_model(**_inputs()).last_hidden_state
        got = BertModel.from_pretrained(tmp_path / "merged").eval()(**_inputs()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_streamed_merge_of_a_vit_saved_under_transformers_older_key_names(tmp_path, kind):
    """transformers 5 saves a ViT under its checkpoints' older names (``vit.encoder.layer.0.attention.attention.query``
    for the module ``vit.layers.0.attention.q_proj``, which a PEFT adapter names). The streamed merge now matches the
    adapter's modules through the renamings ``from_pretrained`` applies and writes the keys as saved; it refused
    every ViT adapter ("match no weight in the base checkpoint"). With the head's trained copy (modules_to_save)."""
    import peft
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, num_labels=3)  # fmt: skip
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    common = dict(target_modules=["q_proj", "fc1", "fc2"], modules_to_save=["classifier"])
    config = (
        peft.LoraConfig(r=2, init_lora_weights=False, **common)
        if kind == "lora"
        else peft.IA3Config(feedforward_modules=["fc2"], init_ia3_weights=False, **common)
    )
    pm = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name or "ia3_l" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    merged = ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, pm(pixel_values=pixels).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip
