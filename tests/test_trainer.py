"""``transformers.Trainer`` on patched models: a run resumed from a checkpoint (``resume_from_checkpoint``) ends with
the losses and weights of the uninterrupted run, bit for bit, across architectures, task heads and adapter kinds
(a patched ViT: ``tests/test_persist.py::test_trainer_resumes_a_patched_vit_and_restores_its_best_checkpoint``)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import adapter_engine as ae

_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _bert():
    return BertForSequenceClassification(BertConfig(**_KW, max_position_embeddings=32, num_labels=3))


def _roberta():
    return RobertaForSequenceClassification(RobertaConfig(**_KW, max_position_embeddings=40, pad_token_id=1,
                                                          num_labels=3))  # fmt: skip


def _distilbert():
    cfg = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3)
    return DistilBertForSequenceClassification(cfg)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _llama():
    return LlamaForCausalLM(LlamaConfig(**_KW, num_key_value_heads=2, max_position_embeddings=32))


# (model, adapters: the first trains, with its modules_to_save copies; the others run frozen)
CASES = {
    "bert-lora-seq_bn": (_bert, [ae.LoraConfig(r=4, modules_to_save=["classifier"]), ae.BottleneckConfig.seq_bn()]),
    "roberta-double_seq_bn-lora": (_roberta, [ae.BottleneckConfig.double_seq_bn(), ae.LoraConfig(r=2)]),
    "distilbert-ia3-par_bn": (
        _distilbert,
        [ae.IA3Config(modules_to_save=["pre_classifier", "classifier"]), ae.BottleneckConfig.par_bn()],
    ),
    "gpt2-par_bn-ia3": (_gpt2, [ae.BottleneckConfig.par_bn(), ae.IA3Config()]),
    "llama-lora-double_seq_bn": (_llama, [ae.LoraConfig(r=4), ae.BottleneckConfig.double_seq_bn()]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_trainer_run_ends_as_the_uninterrupted_run_bit_for_bit(case, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    make, configs = CASES[case]
    names = [f"trn_{case}_{i}" for i in range(len(configs))]

    def build():
        torch.manual_seed(0)
        model = make()
        for name, config in zip(names, configs):
            ae.add_adapter(model, name, config)
        with torch.no_grad():  # the frozen adapters act: random weights
            for n, p in model.named_parameters():
                if any(f".{name}." in n or n.endswith(f".{name}") for name in names[1:]):
                    p.normal_(1.0 if "ia3_l" in n else 0.0, 0.2)
        ae.set_active_adapters(model, names)
        ae.train_adapter(model, names[0])
        return model

    gen = torch.Generator().manual_seed(2)
    lm = make in (_gpt2, _llama)  # (causal LMs: the labels are the inputs)
    data = []
    for i in range(8):
        ids = torch.randint(3, 64, (6,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone() if lm else i % 3})

    def args(**kw):
        return TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=7, data_seed=7,
            dataloader_num_workers=0, **kw,
        )  # fmt: skip

    def losses(trainer):
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    whole, resumed = build(), build()
    run = Trainer(model=whole, args=args(save_steps=1), train_dataset=data)
    run.train()
    again = Trainer(model=resumed, args=args(save_strategy="no"), train_dataset=data)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert losses(again) == losses(run) and len(losses(run)) == 2
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())
