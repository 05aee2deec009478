"""Full fine-tuning (adapter_engine.finetune) and the BBC News data (adapter_engine.data)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from adapter_engine.data import load_bbc_news


def test_bbc_news_split_is_fixed_and_disjoint():
    train, val, test = (load_bbc_news(s) for s in ("train", "validation", "test"))
    assert (len(train.texts), len(val.texts), len(test.texts)) == (1780, 222, 223)
    assert train.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert not set(train.texts[:200]) & set(test.texts)
    assert load_bbc_news("validation", limit=5).texts == val.texts[:5]
    assert set(val.labels) == set(range(5))
    with pytest.raises(ValueError, match="split must be"):
        load_bbc_news("dev")


def test_text_folder_classes_skip_hidden_and_empty_folders(tmp_path):
    """load_text_folder (finetune's labels) and check_text_folder (the demo's check) agree on the classes: hidden
    folders and folders without a .txt document are not classes; fewer than two classes is an error."""
    from adapter_engine.data import check_text_folder, load_text_folder, text_folder_documents

    for label in ("cars", "cats"):
        (tmp_path / label).mkdir()
        for i in range(10):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} {i}")
        (tmp_path / label / ".hidden.txt").write_text("editor backup")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("not a document")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden folder")
    (tmp_path / "stray.txt").write_text("not in a class folder")
    splits = [load_text_folder(str(tmp_path), split) for split in ("train", "validation", "test")]
    assert {s.classes for s in splits} == {("cars", "cats")}
    assert sum(len(s.texts) for s in splits) == 20 and set(splits[0].labels) == {0, 1}
    assert text_folder_documents(str(tmp_path))[0] == ("cars", "cats")
    assert check_text_folder(str(tmp_path)) == str(tmp_path)
    for label in ("cats", "cars"):
        for f in (tmp_path / label).glob("*.txt"):
            f.unlink()
        with pytest.raises(ValueError, match="a classifier needs at least two"):
            load_text_folder(str(tmp_path))
        with pytest.raises(FileNotFoundError, match="holds (one|no) class sub-folder"):
            check_text_folder(str(tmp_path))


def test_a_data_path_that_is_a_file_is_named_as_one(tmp_path):
    """A file given as the data folder (finetune --data, demo --bbc-dir) was reported as a missing folder."""
    from adapter_engine.data import bbc_news_dir, load_text_folder

    (tmp_path / "docs.txt").write_text("one document")
    for load in (load_text_folder, bbc_news_dir):
        with pytest.raises(FileNotFoundError, match=r"docs\.txt' is a file, not a folder of <class>/\*\.txt"):
            load(str(tmp_path / "docs.txt"))
        with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist"):
            load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("limit", [0, -40, 2.5, True])
def test_text_folder_limit_is_a_positive_count(tmp_path, limit):
    from adapter_engine.data import load_text_folder

    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_text_folder(str(tmp_path), limit=limit)


# The real-model fine-tune (MiniLM on BBC News, accuracy must improve) is part of Merge and FFT's chain test in
# tests/test_merging.py; here: the DDP run and the CLI.


_DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from adapter_engine.finetune import full_finetune

    class Synthetic(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(5, 90, (12,), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": int(ids[0] % 2)}

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=99, num_labels=2)
    model = BertForSequenceClassification(config)
    metrics = full_finetune(model, Synthetic(), Synthetic(), args={"output_dir": sys.argv[1], "num_train_epochs": 1,
                            "per_device_train_batch_size": 8, "use_cpu": True})
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    rank = int(os.environ.get("RANK", 0))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"world": world, "digest": digest, "metrics": metrics}, fh)
    if torch.distributed.is_initialized():  # a clean teardown: gloo threads left at exit can abort the process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
def test_full_finetune_runs_under_torchrun_ddp_with_gloo(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script), str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    # 64 examples, 2 ranks x batch 8: 4 optimizer steps per epoch (each rank sees half of the data).
    assert ranks[0]["metrics"]["train_loss"] > 0 and "eval_loss" in ranks[0]["metrics"]


@pytest.mark.slow
def test_cli_finetune_on_a_text_folder(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from adapter_engine.cli import main
    from adapter_engine.demo import minilm_path

    data = tmp_path / "data"
    for label, words in {"cats": "cat kitten purr whiskers", "cars": "car engine wheel road"}.items():
        (data / label).mkdir(parents=True)
        for i in range(20):
            (data / label / f"{i:02d}.txt").write_text(f"{words} {i} " * 5)
    args = ["finetune", "--model", minilm_path(), "--data", str(data), "--out", str(tmp_path / "ft"), "--epochs", "1",
            "--max-length", "32", "--batch-size", "8"]  # fmt: skip
    assert main(args) == 0
    assert "validation accuracy" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft")
    assert model.config.id2label == {0: "cars", 1: "cats"}


class _Synthetic:
    """Tiny two-class token data (the label is the first token's parity); ``fail_at`` raises on that item."""

    def __init__(self, n: int = 32, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        if i == self.fail_at:
            raise RuntimeError("broken example")
        ids = torch.randint(5, 90, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": int(ids[0] % 2)}


def _tiny_classifier():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                        vocab_size=99, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def test_full_finetune_without_output_dir_leaves_no_checkpoints_behind(tmp_path, monkeypatch):
    """Checkpoints of a run without ``output_dir`` live in a temporary folder, deleted when the run ends or fails."""
    import tempfile

    from adapter_engine.finetune import full_finetune

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    args = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "use_cpu": True}
    metrics = full_finetune(_tiny_classifier(), _Synthetic(), _Synthetic(16), args=dict(args))
    assert "eval_loss" in metrics and metrics["train_loss"] > 0  # evaluated, and the best checkpoint was reloaded
    assert list(scratch_root.glob("adapter-engine-fft-*")) == []  # (torch may keep its own caches there)
    with pytest.raises(RuntimeError, match="broken example"):
        full_finetune(_tiny_classifier(), _Synthetic(fail_at=3), None, args=dict(args))
    assert list(scratch_root.glob("adapter-engine-fft-*")) == []
    kept = tmp_path / "kept"
    full_finetune(_tiny_classifier(), _Synthetic(), _Synthetic(16), args={**args, "output_dir": str(kept)})
    assert any(p.name.startswith("checkpoint-") for p in kept.iterdir())  # a folder given by the caller stays


class _Counted(_Synthetic):
    """``_Synthetic`` that counts the examples read."""

    reads = 0

    def __getitem__(self, i):
        type(self).reads += 1
        return super().__getitem__(i)


def test_full_finetune_resumes_from_checkpoint(tmp_path):
    """``resume_from_checkpoint`` (an argument, or the ``TrainingArguments`` field, which ``Trainer.train`` never
    reads) continues the run from its last checkpoint: the second run trains only the epoch the first did not. It was
    ignored: the run started again from step 0 with a fresh optimizer. ``True`` without an ``output_dir`` (checkpoints
    in a new temporary folder, so none to resume) is refused by name."""
    from adapter_engine.finetune import full_finetune

    args = {"per_device_train_batch_size": 8, "use_cpu": True, "output_dir": str(tmp_path / "run"),
            "save_strategy": "epoch"}  # fmt: skip
    full_finetune(_tiny_classifier(), _Synthetic(), None, args={**args, "num_train_epochs": 1})
    _Counted.reads = 0
    metrics = full_finetune(_tiny_classifier(), _Counted(), None,
                            args={**args, "num_train_epochs": 2, "resume_from_checkpoint": True})  # fmt: skip
    assert _Counted.reads == 32 and metrics["epoch"] == 2.0  # epoch 2 only (from the start: 64 reads)
    with pytest.raises(ValueError, match="resume_from_checkpoint=True .* output_dir"):
        full_finetune(_tiny_classifier(), _Synthetic(), None, resume_from_checkpoint=True,
                      args={"use_cpu": True})  # fmt: skip


def test_full_finetune_resumes_a_vit_with_its_trained_weights(tmp_path):
    """transformers 5 saves a ViT under older key names (``vit.encoder.layer.0.attention.attention.query`` for
    ``vit.layers.0.attention.q_proj``), which ``Trainer``'s plain ``load_state_dict(strict=False)`` skipped: a resumed
    ViT went on from its layers' untrained weights (only its embeddings and head were restored), with a warning. A
    resumed run now ends with the uninterrupted run's weights, bit for bit, and the model's ``load_state_dict`` is
    its class's again afterwards."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from adapter_engine.finetune import full_finetune

    def vit():
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, num_labels=3)  # fmt: skip
        return ViTForImageClassification(cfg)

    gen = torch.Generator().manual_seed(2)
    data = [{"pixel_values": torch.randn(3, 8, 8, generator=gen), "labels": i % 3} for i in range(8)]
    args = {"per_device_train_batch_size": 4, "use_cpu": True, "num_train_epochs": 2, "save_strategy": "epoch",
            "learning_rate": 1e-2}  # fmt: skip
    whole, resumed = vit(), vit()
    full_finetune(whole, data, None, args={**args, "output_dir": str(tmp_path / "whole")})
    full_finetune(resumed, data, None, args={**args, "output_dir": str(tmp_path / "resumed")},
                  resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))  # fmt: skip
    assert "load_state_dict" not in resumed.__dict__
    expected = whole.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())


class _Labelled(_Synthetic):
    """``_Synthetic`` with multi-hot labels (3 classes: the parities of the first two tokens, and always the third)
    or a regression target."""

    def __init__(self, n: int, kind: str):
        super().__init__(n)
        self.kind = kind

    def __getitem__(self, i):
        import torch

        item = super().__getitem__(i)
        ids = item["input_ids"]
        if self.kind == "multi_label":
            item["labels"] = torch.tensor([float(ids[0] % 2), float(ids[1] % 2), 1.0])
        else:
            item["labels"] = float(ids[0] % 7) / 7
        return item


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
def test_full_finetune_evaluates_multi_label_and_regression_heads(kind):
    """The default metric of a sequence classifier was the arg-max accuracy whatever its head: a multi-label one
    (multi-hot labels) crashed at the first evaluation, after a whole epoch of training ('operands could not be
    broadcast'), and a regression one (one label) was scored, and its best checkpoint chosen, by a meaningless
    accuracy. Multi-hot labels now take the exact-match accuracy of the positive logits; a regression head is selected
    by its eval loss."""
    import numpy as np

    from adapter_engine.finetune import accuracy_metrics, full_finetune

    model = _tiny_classifier()
    model.config.num_labels = 3 if kind == "multi_label" else 1
    model.config.problem_type = f"{kind}_classification" if kind == "multi_label" else kind
    model.classifier = type(model.classifier)(model.config.hidden_size, model.config.num_labels)
    args = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "use_cpu": True}
    metrics = full_finetune(model, _Labelled(16, kind), _Labelled(8, kind), args=args)
    assert "eval_loss" in metrics and ("eval_accuracy" in metrics) == (kind == "multi_label")
    logits, labels = np.array([[2.0, -1.0, 0.5], [1.0, 1.0, -3.0]]), np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert accuracy_metrics((logits, labels)) == {"accuracy": 0.5}  # row 0 exactly right, row 1 not


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"eval_strategy": "steps", "eval_steps": 2}, ("steps", "steps", True, 2)),
        ({"save_strategy": "steps", "save_steps": 3}, ("steps", "steps", True, 3)),
        ({"eval_strategy": "no"}, ("no", "epoch", False, None)),
        ({"save_strategy": "no"}, ("epoch", "no", False, None)),
        ({}, ("epoch", "epoch", True, None)),
    ],
)
def test_an_evaluation_or_saving_strategy_given_alone_is_followed(tmp_path, given, expected):
    """Evaluating every N steps, or not saving checkpoints, was refused by TrainingArguments
    ('--load_best_model_at_end requires the save and eval strategy to match'), a flag the caller never set: the default
    best-model restore kept saving per epoch. The other strategy now follows the one given (its steps too), and the
    best model is restored only where evaluations and checkpoints both run."""
    from adapter_engine.finetune import default_training_arguments

    args = default_training_arguments(str(tmp_path), True, None, **given)
    *strategies, steps = expected
    assert [args.eval_strategy.value, args.save_strategy.value, args.load_best_model_at_end] == strategies
    if steps is not None:
        assert args.eval_steps == args.save_steps == steps


def test_full_finetune_with_named_evaluation_sets_selects_by_the_first(tmp_path):
    """A dict of evaluation sets (Trainer names their metrics ``eval_<name>_<metric>``) crashed after the first epoch:
    the default best-model metric 'eval_accuracy' is not among them (KeyError). A bare metric now names the first
    set's; a loss metric under a set's name ('a_loss') is minimised (it was maximised: only 'loss' counted as one)."""
    from adapter_engine.finetune import default_training_arguments, full_finetune

    args = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "use_cpu": True}
    metrics = full_finetune(_tiny_classifier(), _Synthetic(16), {"a": _Synthetic(8), "b": _Synthetic(8)}, args=args)
    assert {"eval_a_accuracy", "eval_b_accuracy"} <= set(metrics)
    assert default_training_arguments(str(tmp_path), True, "a_loss").greater_is_better is False
    assert default_training_arguments(str(tmp_path), True, "a_accuracy").greater_is_better is True


def test_full_finetune_trains_16_bit_models_through_float32_master_weights(tmp_path):
    """A bfloat16 model trains as float32 masters, rounded back once at the end (and after a failed run): the run of
    its float32 copy, rounded. In its own dtype, an AdamW step below half a unit in bf16's last place (8 bits) is
    lost: far fewer weights moved."""
    import torch

    from adapter_engine.finetune import full_finetune

    args = {"num_train_epochs": 2, "learning_rate": 1e-5, "per_device_train_batch_size": 4, "use_cpu": True,
            "output_dir": str(tmp_path / "run")}  # fmt: skip
    query = lambda model: model.bert.encoder.layer[0].attention.self.query.weight
    reference = _tiny_classifier().to(torch.bfloat16).float()
    before = query(reference).detach().to(torch.bfloat16)
    full_finetune(reference, _Synthetic(64), None, args=args)
    trained = {}
    for masters in (True, False):
        model = _tiny_classifier().to(torch.bfloat16)
        weight = query(model)
        full_finetune(model, _Synthetic(64), None, args=args, master_weights=masters)
        assert query(model) is weight  # the same Parameter, converted in place
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        trained[masters] = weight.detach()
    assert torch.equal(trained[True], query(reference).detach().to(torch.bfloat16))
    moved = {m: (w != before).float().mean().item() for m, w in trained.items()}
    assert moved[False] < moved[True] / 2, moved
    model = _tiny_classifier().to(torch.float16)
    with pytest.raises(RuntimeError, match="broken example"):
        full_finetune(model, _Synthetic(fail_at=3), None, args=args)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
