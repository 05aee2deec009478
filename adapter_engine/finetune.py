"""Full fine-tuning with ``transformers.Trainer`` and sensible defaults (the "FFT" of Merge and FFT)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def accuracy_metrics(eval_prediction) -> dict[str, float]:
    """``compute_metrics`` for classification: accuracy of the arg-max logits; with multi-hot labels (one column per
    class, multi-label classification) the fraction of rows whose labels the positive logits give exactly."""
    logits, labels = eval_prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    if np.ndim(labels) == np.ndim(logits) and np.shape(labels) == np.shape(logits):
        return {"accuracy": float(((logits > 0) == (labels > 0.5)).all(axis=-1).mean())}
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give a tokenizer without a pad token (GPT-2, Llama) its EOS token as the pad token, as is common practice, and
    ``model.config.pad_token_id`` the pad token's id when unset (a decoder classifier finds each row's last real
    token by it). A tokenizer with neither is a ValueError."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token to pad with; "
                "add a pad token to it (tokenizer.add_special_tokens({'pad_token': ...}))"
            )
        tokenizer.pad_token = tokenizer.eos_token
        log.info("the tokenizer has no pad token: padding with its EOS token %r", tokenizer.eos_token)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def default_training_arguments(output_dir: str, has_eval: bool, metric: str | None, **overrides: Any):
    """The defaults: 3 epochs, batch 16, lr 5e-5 with 6% warmup, weight decay 0.01, evaluation and saving per
    epoch with the best model (by ``metric``, else eval loss) restored at the end, bf16 (else fp16) mixed
    precision on a GPU, no external loggers. ``overrides`` are any ``TrainingArguments`` fields; an evaluation or
    a saving strategy given alone is followed by the other (steps included), and the best model is restored only
    where both run (``TrainingArguments`` refuses it otherwise)."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio).
    warmup = {"warmup_ratio": 0.06} if "warmup_ratio" in fields else {"warmup_steps": 0.06}
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        **warmup,
        weight_decay=0.01,
        gradient_accumulation_steps=1,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="epoch" if has_eval else "no",
        load_best_model_at_end=has_eval,
        metric_for_best_model=(metric or "loss") if has_eval else None,
        greater_is_better=None if not has_eval else not (metric or "loss").endswith("loss"),
        save_total_limit=1 if has_eval else None,
        bf16=bf16,
        fp16=cuda and not bf16,
        logging_steps=10,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    if has_eval and "load_best_model_at_end" not in overrides:
        _follow_strategy(values, overrides)
    return TrainingArguments(**values)


def _follow_strategy(values: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Keep the default best-model restore consistent with an evaluation or saving strategy the caller gave alone:
    ``TrainingArguments`` refuses ``load_best_model_at_end`` unless checkpoints are saved when evaluations run, and
    the caller never asked for it. The strategy not given follows the given one; with no evaluations or no
    checkpoints there is no best model to restore."""

    def plain(value) -> str:
        return str(getattr(value, "value", value))

    given, other = ("eval", "save") if "eval_strategy" in overrides else ("save", "eval")
    if f"{given}_strategy" in overrides and f"{other}_strategy" not in overrides:
        strategy = plain(values[f"{given}_strategy"])
        if strategy in ("steps", "epoch"):
            values[f"{other}_strategy"] = strategy
            if f"{given}_steps" in overrides and f"{other}_steps" not in overrides:
                values[f"{other}_steps"] = overrides[f"{given}_steps"]
    evaluation, saving = plain(values["eval_strategy"]), plain(values["save_strategy"])
    values["load_best_model_at_end"] = evaluation != "no" and saving in (evaluation, "best")


def full_finetune(
    model: torch.nn.Module,
    train_dataset,
    eval_dataset=None,
    args=None,
    compute_metrics: Callable | None = None,
    *,
    data_collator=None,
    metric_for_best_model: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    master_weights: bool = True,
) -> dict[str, float]:
    """Train every parameter of ``model`` with ``transformers.Trainer``; return the train and eval metrics.

    Args:
        model: any HF model (for example one whose adapter was just merged with ``merge_adapter``).
        train_dataset / eval_dataset: datasets of dicts the model accepts (``labels`` included).
        args: a ``TrainingArguments``, a dict of overrides of :func:`default_training_arguments`, or None.
            Without an ``output_dir`` the checkpoints go to a temporary folder that is deleted when training
            ends (the best one is loaded into ``model`` first); pass one to keep them.
        compute_metrics: as in ``Trainer``; classification models default to :func:`accuracy_metrics`.
        metric_for_best_model: e.g. ``"accuracy"`` (default: accuracy when it is computed, else eval loss). With a
            dict of evaluation sets, ``Trainer`` names their metrics ``<name>_<metric>``: a bare metric is the first
            set's.
        resume_from_checkpoint: a checkpoint folder, or True for the last one in ``output_dir``, passed to
            ``Trainer.train`` (default: ``args.resume_from_checkpoint``, which ``Trainer`` itself never reads).
        master_weights: train float16 / bfloat16 parameters as float32 copies (mixed precision's master weights,
            as ``Trainer`` trains a float32 model; its ``bf16`` / ``fp16`` autocast still computes in 16 bits on a
            GPU), rounded back to their dtype once when training ends or fails. False trains them in their own
            dtype: half the weight, gradient and optimizer memory, but an AdamW step smaller than half a unit in
            the last place is lost (bf16 keeps 8 bits: a tiny BERT in bf16 at lr 1e-5 changed 9% of its weights
            over 32 steps, 44% with masters).

    Runs unchanged under ``torchrun`` (DDP; the gloo backend on CPU).
    """
    from transformers import Trainer, TrainingArguments

    config = getattr(model, "config", None)
    if compute_metrics is None and hasattr(config, "num_labels") and eval_dataset is not None:
        # (one label is regression, as transformers' heads take it: no accuracy to compute or select the best model by)
        regression = config.num_labels == 1 or getattr(config, "problem_type", None) == "regression"
        if "ForSequenceClassification" in type(model).__name__ and not regression:
            compute_metrics = accuracy_metrics
    if metric_for_best_model is None and compute_metrics is accuracy_metrics:
        metric_for_best_model = "accuracy"
    if isinstance(eval_dataset, Mapping) and eval_dataset:  # (Trainer evaluates each set under its name)
        metric = metric_for_best_model or "loss"
        if not any(metric.removeprefix("eval_").startswith(f"{name}_") for name in eval_dataset):
            metric_for_best_model = f"{next(iter(eval_dataset))}_{metric.removeprefix('eval_')}"
    scratch = None  # the checkpoint folder made here when none was given: removed when training ends
    if not isinstance(args, TrainingArguments):
        overrides = dict(args or {})
        output_dir = overrides.pop("output_dir", None)
        if output_dir is None:
            scratch = output_dir = tempfile.mkdtemp(prefix="adapter-engine-fft-")
        args = default_training_arguments(output_dir, eval_dataset is not None, metric_for_best_model, **overrides)
    if resume_from_checkpoint is None:
        resume_from_checkpoint = args.resume_from_checkpoint
    if resume_from_checkpoint is True and scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ValueError(
            "resume_from_checkpoint=True resumes from the last checkpoint in output_dir, and none was given (the "
            "checkpoints would go to a new temporary folder): pass the output_dir of the run to resume"
        )
    trainable = 0
    for param in model.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)
            trainable += param.numel()
    log.info("full fine-tuning: %.2fM trainable parameters", trainable / 1e6)
    lowered = _to_float32(model) if master_weights else {}
    renaming = _read_older_key_names(model)
    try:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics,
            data_collator=data_collator,
        )
        train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
        metrics: dict[str, float] = dict(train_output.metrics)
        metrics["trainable_parameters"] = trainable
        if eval_dataset is not None:
            metrics.update(trainer.evaluate())
    finally:
        if renaming:
            del model.__dict__["load_state_dict"]
        for param, dtype in lowered.items():
            param.data = param.data.to(dtype)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return _plain(metrics)


def _read_older_key_names(model: torch.nn.Module) -> bool:
    """Give ``model`` (for the run) the ``load_state_dict`` of a patched model, which reads a checkpoint key under the
    name ``from_pretrained`` gives it (:func:`~adapter_engine.persist.load_state_dict`); ``Trainer`` resumes and
    restores the best checkpoint through it. transformers 5 saves some models (ViT) under older key names, which a
    plain ``load_state_dict(strict=False)`` skipped: a resumed ViT went on from its layers' untrained weights. Returns
    whether it was bound here (a patched model has it already)."""
    import functools

    from .persist import load_state_dict

    if "load_state_dict" in model.__dict__:
        return False
    model.__dict__["load_state_dict"] = functools.partial(load_state_dict, model)
    return True


def _to_float32(model: torch.nn.Module) -> dict[torch.nn.Parameter, torch.dtype]:
    """Make ``model``'s float16 / bfloat16 parameters float32 in place (the same Parameter objects, as ``.to()``
    converts them); returns each one's dtype, to round it back."""
    lowered = {p: p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    for param in lowered:
        param.data = param.data.float()
    if lowered:
        log.info("training %d float16 / bfloat16 parameters as float32 master weights", len(lowered))
    return lowered


def _plain(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))}
