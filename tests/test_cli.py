"""The ``adapter-engine`` command line (adapter_engine.cli): user errors are one line with exit code 2, numeric flags
are checked by argparse, outputs are checked before any work and written with the umask's modes, and the README's
CLI reference names every flag."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from adapter_engine.cli import _build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "car", "dog"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=64)  # fmt: skip


def _text_folder(root: pathlib.Path, classes=("cars", "cats", "dogs"), per_class: int = 10) -> pathlib.Path:
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (root / label / f"{i:02d}.txt").write_text(
                f"{VOCAB[-3 + c]} {' '.join('abc'[(i + j) % 3] for j in range(5))}"
            )
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``bert`` (3-label BERT classifier + tokenizer), ``bert5`` (5 labels), ``lora`` (a PEFT LoRA of ``bert``),
    ``data`` (3 classes x 10 documents)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(str(root / "vocab.txt"))
    torch.manual_seed(0)
    for name, labels in (("bert", 3), ("bert5", 5)):
        BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), num_labels=labels, **TINY)).save_pretrained(
            root / name
        )
        tokenizer.save_pretrained(root / name)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    pm = get_peft_model(BertForSequenceClassification.from_pretrained(root / "bert"), config)
    pm.save_pretrained(root / "lora")
    _text_folder(root / "data")
    return root


def _fails(argv, capsys, *fragments) -> str:
    """Run the CLI, expect a usage error: exit code 2 and ``adapter-engine <command>: error: ...`` naming
    ``fragments`` as the last line of stderr (argparse's own errors print the usage above it)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"adapter-engine {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


# ------------------------------------------------------------------------------------------------ plan
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--gpu", "foo"], "argument --gpu: invalid choice: 'foo'"),
        (["--gpu-memory", "abc"], "cannot read a memory size from 'abc'"),
        (["--gpu-memory", "0"], "argument --gpu-memory: must be a positive size"),
        (["--tflops", "nan"], "argument --tflops: must be a finite number"),
        (["--tflops", "inf"], "argument --tflops: must be a finite number"),
        (["--tflops", "0"], "argument --tflops: must be a finite positive number"),
        (["--domains", "0"], "argument --domains: must be a positive whole number, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive whole number"),
        (["--seq-len", "-1"], "argument --seq-len: must be a positive whole number, got '-1'"),
        (["--head", "foo"], "argument --head: invalid choice: 'foo'"),
    ],
)
def test_plan_rejects_bad_numbers_and_names_in_argparse(assets, capsys, extra, fragment):
    _fails(["plan", "--model", assets / "bert", *extra], capsys, fragment)


def test_plan_model_errors_are_one_line(assets, tmp_path, capsys):
    _fails(["plan", "--model", tmp_path / "nowhere"], capsys, "nowhere", "neither a model folder nor a config.json")
    (tmp_path / "bad.json").write_text("{not json")
    _fails(["plan", "--model", tmp_path / "bad.json"], capsys, "bad.json", "is not a readable config.json")
    _fails(["plan", "--model", assets / "bert" / "model.safetensors"], capsys, "model.safetensors", "not a text file")
    (tmp_path / "t5.json").write_text('{"model_type": "t5"}')
    _fails(["plan", "--model", tmp_path / "t5.json"], capsys, "'t5' is not one the planner knows")
    (tmp_path / "foo.json").write_text('{"model_type": "foo"}')  # unknown to transformers: its error lists 400+ types
    message = _fails(["plan", "--model", tmp_path / "foo.json"], capsys, "'foo' is not one the planner knows (bert,")
    assert len(message) < 200, message


def test_plan_gpu_memory_without_a_unit_is_gigabytes(assets, capsys):
    import json

    assert main(["plan", "--model", str(assets / "bert"), "--gpu-memory", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware"]["memory_bytes"] == 24 * 2**30
    help_text = _build_parser()[1]["plan"].format_help()
    assert "a bare number is GB" in " ".join(help_text.split())
    assert "image-classification for ViT" in " ".join(help_text.split())  # the --head help is whole


def test_errors_are_one_line_without_traceback_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "adapter_engine.cli", "plan", "--model", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("adapter-engine plan: error: ")


def test_debug_and_internal_errors_keep_their_traceback(assets, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["plan", "--debug", "--model", str(tmp_path / "nowhere")])
    import adapter_engine.planner

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(adapter_engine.planner, "plan", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["plan", "--model", str(assets / "bert")])


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--density", "0"], "argument --density: must be a fraction in (0, 1]"),
        (["--density", "1.5"], "argument --density: must be a fraction in (0, 1]"),
        (["--weight", "nan"], "argument --weight: must be a finite number"),
        (["--device", "foo"], "argument --device: 'foo' is not a device usable here"),
    ],
)
def test_merge_rejects_bad_numbers_and_devices_in_argparse(assets, tmp_path, capsys, extra, fragment):
    _fails(["merge", "--model", assets / "bert", "--adapter", assets / "lora", "--out", tmp_path / "o", *extra],
           capsys, fragment)  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["merge", "merge-checkpoint"])
def test_merge_errors_are_one_line_and_write_nothing(assets, tmp_path, capsys, command):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "out"
    args = lambda model=assets / "bert", adapter=assets / "lora": [  # noqa: E731
        command, "--model", model, "--adapter", adapter, "--out", out]  # fmt: skip
    _fails(args(model=tmp_path / "nowhere"), capsys, "nowhere")
    _fails(args(adapter=tmp_path / "nowhere"), capsys, "nowhere", "does not exist")
    from peft import LoraConfig, get_peft_model

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=48))  # fmt: skip
    get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "llama_lora")
    _fails(args(adapter=tmp_path / "llama_lora"), capsys, "q_proj")  # another architecture's adapter
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(args(), capsys, "exists; pass --overwrite to replace it")
    _fails(args(model=out), capsys, "(it is the --model folder)")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a file is never replaced by a folder
        _fails(args()[:-1] + [tmp_path / "file", *extra], capsys, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "llama_lora", "out"]  # no partial folders left


def test_merge_names_each_adapter_after_its_folder(assets, tmp_path, capsys):
    """The adapters of a merge were named ``adapter0``, ``adapter1``, ...: an error about one (TIES of an IA3
    adapter, a bottleneck adapter without --absorb) named one of those, which the user never typed, and no folder.
    Each is now named after its folder (as ``load_adapter`` names it), made unique; the same folder twice merges."""
    from peft import IA3Config, get_peft_model
    from transformers import BertForSequenceClassification

    ia3 = IA3Config(target_modules=["query", "value"], feedforward_modules=[], init_ia3_weights=False)
    get_peft_model(BertForSequenceClassification.from_pretrained(assets / "bert"), ia3).save_pretrained(
        tmp_path / "my.ia3"
    )
    args = ["merge", "--model", assets / "bert", "--adapter", assets / "lora", "--adapter", tmp_path / "my.ia3"]
    _fails([*args, "--combination", "ties", "--out", tmp_path / "o"], capsys, "['lora', 'my_ia3'] includes IA3")
    assert main([str(a) for a in args[:-2]] + ["--adapter", str(assets / "lora"), "--out", str(tmp_path / "o")]) == 0
    assert "merged 2 adapter(s)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["merge", "merge-checkpoint", "finetune", "plan"])
def test_an_adapter_folder_given_as_the_model_is_named_as_one(assets, capsys, tmp_path, command):
    """--model and --adapter swapped: transformers said the adapter folder's config.json, which it lacks, has no
    model_type (merge-checkpoint: no model.safetensors; finetune: no tokenizer files)."""
    inputs = {"finetune": ["--data", assets / "data"], "plan": []}.get(command, ["--adapter", assets / "bert"])
    out = [] if command == "plan" else ["--out", tmp_path / "o"]
    _fails([command, "--model", assets / "lora", *inputs, *out], capsys, "lora' is an adapter folder", "--adapter")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["merge", "merge-checkpoint", "finetune"])
def test_an_out_that_cannot_be_made_is_named_before_any_work(assets, tmp_path, capsys, monkeypatch, command):
    """--out below a file, or in a folder this process cannot write, failed only when the finished model was written
    (after the merge, or after training), with an OSError naming neither --out nor the reason."""
    import adapter_engine.finetune

    monkeypatch.setattr(adapter_engine.finetune, "full_finetune", lambda *a, **k: pytest.fail("trained"))
    inputs = ["--data", assets / "data"] if command == "finetune" else ["--adapter", assets / "lora"]
    args = lambda out: [command, "--model", assets / "bert", *inputs, "--out", out]  # noqa: E731
    (tmp_path / "file").write_text("mine")
    _fails(args(tmp_path / "file" / "new" / "out"), capsys, "--out", "cannot be made", "file' is a file, not a folder")
    (tmp_path / "locked").mkdir()
    access, locked = os.access, str(tmp_path / "locked")  # (as root, os.access allows every write)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != locked and access(path, mode))
    _fails(args(tmp_path / "locked" / "new" / "out"), capsys, "--out", "no permission to write in", "locked")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"] and not any((tmp_path / "locked").iterdir())


@pytest.mark.parametrize("command", ["merge", "merge-checkpoint"])
def test_merge_output_has_no_base_weights_of_other_formats_and_umask_modes(assets, tmp_path, capsys, command):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(assets / "bert", base)
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "pytorch_model.bin.index.json",
                 "training_state.pt"):  # fmt: skip
        (base / name).write_bytes(b"stale unmerged weights")
    old = os.umask(0o027)
    try:
        assert (
            main([command, "--model", str(base), "--adapter", str(assets / "lora"), "--out", str(tmp_path / "o")]) == 0
        )
    finally:
        os.umask(old)
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= names, names
    assert not names & {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "pytorch_model.bin.index.json",
                        "training_state.pt"}  # fmt: skip
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750  # the umask's folder mode, not mkdtemp's 0700


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious .bin checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_DAMAGES = ("code in .bin", "truncated .bin", "truncated safetensors", "config value")


@pytest.mark.parametrize(
    "command, damage", [(c, d) for c in ("merge", "finetune") for d in _DAMAGES] + [("plan", "config value")]
)
def test_a_damaged_or_unsafe_model_folder_is_named(assets, tmp_path, capsys, monkeypatch, command, damage):
    """A .bin that torch.load(weights_only=True) refuses was a traceback (UnpicklingError) and the code in it never ran;
    a truncated .bin said '[Errno 22] Invalid argument', a truncated safetensors file or a config.json field of the
    wrong type named no path (the last was a traceback too). Each now names --model, before anything is written."""
    import shutil

    import adapter_engine.finetune

    monkeypatch.setattr(adapter_engine.finetune, "full_finetune", lambda *a, **k: pytest.fail("trained"))
    model = tmp_path / "model"
    shutil.copytree(assets / "bert", model)
    if damage == "config value":
        config = (model / "config.json").read_text()
        (model / "config.json").write_text(config.replace('"hidden_size": 32', '"hidden_size": "big"'))
    elif damage == "truncated safetensors":
        with open(model / "model.safetensors", "r+b") as fh:
            fh.truncate(5000)
    else:
        from safetensors.torch import load_file

        state = load_file(model / "model.safetensors")
        (model / "model.safetensors").unlink()
        if damage == "code in .bin":
            state["evil"] = _RunsCode(tmp_path / "ran")
        torch.save(state, model / "pytorch_model.bin")
        if damage == "truncated .bin":
            with open(model / "pytorch_model.bin", "r+b") as fh:
                fh.truncate(5000)
    inputs = {"merge": ["--adapter", assets / "lora"], "finetune": ["--data", assets / "data"], "plan": []}[command]
    out = [] if command == "plan" else ["--out", tmp_path / "o"]
    expected = "weights_only=True refuses" if damage == "code in .bin" else "cannot be loaded"
    _fails([command, "--model", model, *inputs, *out], capsys, f"--model '{model}", expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written, and no code ran


# ------------------------------------------------------------------------------------------------ finetune
@pytest.fixture
def no_training(monkeypatch):
    """The checks under test come before training: training here is a failure."""
    import adapter_engine.finetune

    def fail(*args, **kwargs):
        raise AssertionError("trained before checking the arguments")

    monkeypatch.setattr(adapter_engine.finetune, "full_finetune", fail)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--limit", "-40"], "argument --limit: must be a positive whole number, got '-40'"),
        (["--limit", "0"], "argument --limit: must be a positive whole number, got '0'"),
        (["--epochs", "-1"], "argument --epochs: must be a finite positive number"),
        (["--epochs", "nan"], "argument --epochs: must be a finite number"),
        (["--max-length", "0"], "argument --max-length: must be a positive whole number"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive whole number"),
        (["--lr", "nan"], "argument --lr: must be a finite number"),
        (["--lr=-1e-5"], "argument --lr: must be a finite positive number"),
    ],
)
def test_finetune_rejects_bad_numbers_in_argparse(assets, tmp_path, capsys, no_training, extra, fragment):
    _fails(["finetune", "--model", assets / "bert", "--data", assets / "data", "--out", tmp_path / "o", *extra],
           capsys, fragment)  # fmt: skip


def test_finetune_checks_its_inputs_before_training(assets, tmp_path, capsys, no_training):
    args = lambda model=assets / "bert", data=assets / "data", out=tmp_path / "o": [  # noqa: E731
        "finetune", "--model", model, "--data", data, "--out", out]  # fmt: skip
    (tmp_path / "file").write_text("mine")
    _fails(args(out=tmp_path / "file"), capsys, "--out", "is a file, not a folder")
    _fails(args(out=tmp_path / "file") + ["--overwrite"], capsys, "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _fails(args(out=tmp_path / "full"), capsys, "exists; pass --overwrite to replace it")
    _fails(args(model=tmp_path / "nowhere"), capsys, "--model", "nowhere", "does not exist")
    _fails(args(data=tmp_path / "nowhere"), capsys, "nowhere", "does not exist")
    _fails(args(model=assets / "bert5"), capsys, "5 labels", "3 classes (cars, cats, dogs)")
    _fails(args(data=_text_folder(tmp_path / "small", per_class=3)), capsys, "has 9 documents",
           "0 validation documents", "at least 10")  # fmt: skip
    _fails(args(data=_text_folder(tmp_path / "one", classes=("cars",))), capsys, "a classifier needs at least two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "one", "small"]


def test_finetune_checks_one_row_through_the_model_before_training(assets, tmp_path, capsys, no_training):
    """The default --max-length 128 on a model with 64 learned positions, or a tokenizer of a larger vocabulary, failed
    in the first training step with a traceback (RuntimeError / IndexError); both are named before training."""
    import shutil

    from transformers import BertTokenizerFast

    args = lambda model, *extra: ["finetune", "--model", model, "--data", assets / "data", "--out", tmp_path / "o",
                                  *extra]  # fmt: skip  # noqa: E731
    _fails(args(assets / "bert"), capsys, "--max-length 128 tokens", "max_position_embeddings=64")
    model = tmp_path / "model"
    shutil.copytree(assets / "bert", model)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(model / name)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:-3] + [f"w{i}" for i in range(60)] + VOCAB[-3:]) + "\n")
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(model)
    _fails(args(model, "--max-length", "16"), capsys, "its tokenizer gives token id 93", f"{len(VOCAB)} rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "vocab.txt"]


def test_finetune_overwrite_replaces_out_and_writes_umask_modes(assets, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    args = ["finetune", "--model", str(assets / "bert"), "--data", str(assets / "data"), "--out", str(tmp_path / "o"),
            "--epochs", "1", "--batch-size", "8", "--max-length", "8", "--overwrite"]  # fmt: skip
    old = os.umask(0o022)
    try:
        assert main(args) == 0
    finally:
        os.umask(old)
    assert "validation accuracy" in capsys.readouterr().out
    assert not (tmp_path / "o" / "old.txt").exists()
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert model.config.id2label == {0: "cars", 1: "cats", 2: "dogs"}


def test_finetune_a_decoder_whose_tokenizer_has_no_pad_token(assets, tmp_path, capsys, caplog):
    """GPT-2's tokenizer has no pad token: the CLI pads with its EOS token (logged) and sets the config's
    pad_token_id, which GPT2ForSequenceClassification needs to find each row's last token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    tokenizer.save_pretrained(tmp_path / "gpt2")
    args = ["finetune", "--model", str(tmp_path / "gpt2"), "--data", str(assets / "data"), "--out",
            str(tmp_path / "o"), "--epochs", "1", "--batch-size", "8", "--max-length", "16"]  # fmt: skip
    with caplog.at_level("INFO", logger="adapter_engine.finetune"):
        assert main(args) == 0
    assert "padding with its EOS token" in caplog.text
    assert AutoConfig.from_pretrained(tmp_path / "o").pad_token_id == 0


# ------------------------------------------------------------------------------------------------ README
def test_readme_cli_reference_names_every_flag():
    """Each command's row in the README's CLI reference names each of its flags (--help and --debug aside)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## CLI reference") :]
    section = section[: section.index("\n## ", 1)]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `adapter-engine ([a-z-]+) .*$", section, flags=re.M)}
    for name, command in _build_parser()[1].items():
        assert name in rows, f"no README row for {name}"
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--debug"):
                    assert re.search(rf"{re.escape(flag)}\b", rows[name]), f"README's {name} row lacks {flag}"


def test_only_the_demo_re_executes_itself_under_the_interpreter(monkeypatch):
    """As the README's CLI reference says (it said every command did): without a GPU the demo re-executes itself with
    TRITON_INTERPRET=1; the other commands run in this process (the torch twins)."""
    import adapter_engine.cli as cli
    import adapter_engine.data
    import adapter_engine.demo

    class Execs(Exception):
        pass

    def execve(path, argv, env):
        raise Execs(argv, env.get("TRITON_INTERPRET"))

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (read by kernels when imported, which they are already)
    monkeypatch.delenv("ADAPTER_ENGINE_NO_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("merge", "merge-checkpoint", "finetune", "plan"):  # the work itself is not under test here
        monkeypatch.setattr(cli, f"_{command.replace('-', '_')}", lambda args: 0)
    monkeypatch.setattr(adapter_engine.demo, "minilm_path", lambda path=None: "model")
    monkeypatch.setattr(adapter_engine.data, "bbc_news_dir", lambda path=None: "bbc")
    for argv in (["merge", "--model", "m", "--adapter", "a", "--out", "o"], ["plan", "--model", "m"],
                 ["merge-checkpoint", "--model", "m", "--adapter", "a", "--out", "o"],
                 ["finetune", "--model", "m", "--data", "d", "--out", "o"]):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["adapter-engine", *argv])
        assert main() == 0
    monkeypatch.setattr(sys, "argv", ["adapter-engine", "demo", "--out", "demo"])
    with pytest.raises(Execs) as exc:
        main()
    assert exc.value.args[1] == "1" and exc.value.args[0][-3:] == ["demo", "--out", "demo"]
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "Without a GPU `adapter-engine demo` re-executes itself with `TRITON_INTERPRET=1`" in text


def test_python_dash_m_runs_the_command_line():
    """``python -m adapter_engine`` is the ``adapter-engine`` command (it had no ``__main__``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "adapter_engine", "--help"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: adapter-engine") and "merge-checkpoint" in out.stdout
