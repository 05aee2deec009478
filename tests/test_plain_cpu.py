"""The public API on a CPU without the Triton interpreter: every op takes its torch twin there.

The rest of the CPU tier runs the kernels in the interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` before
any kernel module is imported), so these run in a subprocess without it: what a user's own script on a laptop
gets. Each scenario checks its numbers against another way of computing them, not only that nothing raised."""

import os
import subprocess
import sys
import textwrap

_PRELUDE = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaModel

    import adapter_engine as ae
    from adapter_engine.kernels import _backend

    assert not _backend.INTERPRET and not torch.cuda.is_available()
    torch.manual_seed(0)
    TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def llama():
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=128)
        return LlamaModel(config).eval()
    """
)


def run_plain(script: str) -> str:
    """Runs ``_PRELUDE`` + ``script`` in a fresh interpreter without ``TRITON_INTERPRET``; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _PRELUDE + textwrap.dedent(script)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_serving_a_mixed_batch_of_lora_adapters():
    """Rows routed to different LoRA adapters (and to none) in one forward equal each row run alone. (It raised
    "0 active drivers": the mixed-batch dispatch timed its Triton candidates on a CPU tensor.)"""
    run_plain(
        """
        model = llama()
        for i in range(3):
            ae.add_adapter(model, f"a{i}", ae.LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False))
        ids = torch.randint(0, 128, (8, 5))
        routes = [None if i % 4 == 3 else f"a{i % 4}" for i in range(8)]
        with torch.no_grad():
            with ae.use_adapters(routes):
                mixed = model(input_ids=ids).last_hidden_state
            for i, r in enumerate(routes):
                with ae.use_adapters(r):
                    alone = model(input_ids=ids[i : i + 1]).last_hidden_state
                torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )


def test_the_kernel_ops_take_their_torch_twins():
    """Every public op of ``adapter_engine.kernels`` on CPU tensors equals its formula written out in torch, and the
    fused LoRA op's gradients equal autograd's of that formula. (The bottleneck stack's launcher,
    ``bottleneck_stack_fwd``, raised "0 active drivers": it launched its Triton kernel on a CPU tensor.)"""
    run_plain(
        """
        from torch.nn.functional import layer_norm, relu
        from adapter_engine import kernels as K

        close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        H, R = 32, 8
        h, y, ln_w, ln_b = torch.randn(2, 5, H), torch.randn(2, 5, H), torch.rand(H) + 0.5, torch.randn(H)
        wd, bd = [torch.randn(R, H) * 0.2 for _ in range(2)], [torch.randn(R) * 0.1 for _ in range(2)]
        wu, bu = [torch.randn(H, R) * 0.2 for _ in range(2)], [torch.randn(H) * 0.1 for _ in range(2)]
        packed = K.pack_adapters(wd, bd, wu, bu, ["relu", "relu"], [1.0, 0.5])
        # two seq_bn levels in AdapterHub's order: r <- s * up(relu(down(LN(r + y)))) + r, then LN(r + y)
        ln = lambda t: layer_norm(t, (H,), ln_w, ln_b, 1e-12)
        r = h
        for i, s in enumerate((1.0, 0.5)):
            r = s * (relu(ln(r + y) @ wd[i].T + bd[i]) @ wu[i].T + bu[i]) + r
        opts = K.StackOptions()
        close(K.bottleneck_stack_fwd(h, y, ln_w, ln_b, packed, torch.tensor([[0, 1]] * 10, dtype=torch.int32), opts),
              ln(r + y))
        close(K.bottleneck_stack(h, y, packed, torch.tensor([0, 1]), opts, ln_w, ln_b), ln(r + y))

        x, w, bias = torch.randn(7, 24, requires_grad=True), torch.randn(16, 24), torch.randn(16)
        A, B = torch.randn(4, 24, requires_grad=True), torch.randn(16, 4, requires_grad=True)
        want = x @ w.T + bias + 0.5 * (x @ A.T) @ B.T
        grads = torch.autograd.grad(want.sum(), (x, A, B))
        for path in ("auto", "fused", "epilogue", "addmm", "composition", "persistent"):
            got = K.lora_linear(x, w, A, B, 0.5, bias, path=path)
            close(got, want)
            for g, ref in zip(torch.autograd.grad(got.sum(), (x, A, B)), grads):
                close(g, ref)
        ids = torch.tensor([0, 1, -1, 1, 0, 0, 1], dtype=torch.int32)
        As, Bs, scales = [torch.randn(4, 24), torch.randn(2, 24)], [torch.randn(16, 4), torch.randn(16, 2)], [0.5, 2.0]
        want = x @ w.T + bias
        want = torch.stack([row + scales[a] * (x[i] @ As[a].T) @ Bs[a].T if a >= 0 else row
                            for i, (row, a) in enumerate(zip(want, ids.tolist()))])
        for path in ("auto", "segmented", "fused"):
            close(K.lora_linear(x, w, As, Bs, scales, bias, adapter_ids=ids, path=path), want)
        plan = K.plan_segments(ids, [4, 2], scales)
        close(K.lora_segmented_fwd(x, w, torch.cat(As), torch.cat(Bs, 1), plan, bias)[0], want)

        w0, v = torch.randn(16, 24), torch.rand(16) + 0.5
        merged = w0.clone()
        close(K.merge_lora_(merged, A.detach(), B.detach(), 0.5), w0 + 0.5 * B.detach() @ A.detach())
        close(K.unmerge_lora_(merged, A.detach(), B.detach(), 0.5), w0)
        many = [w0.clone(), w0.clone()]
        K.merge_lora_many_(many, [As, As[0]], [Bs, Bs[0]], [scales, 1.0])
        close(many[0], w0 + 0.5 * Bs[0] @ As[0] + 2.0 * Bs[1] @ As[1])
        close(many[1], w0 + Bs[0] @ As[0])
        close(K.scale_ia3_(w0.clone(), v, dim=0), w0 * v[:, None])
        a, b = torch.randn(5, H), torch.randn(5, H)
        close(K.add_layer_norm(a, b, ln_w, ln_b, 1e-5)[1], layer_norm(a + b, (H,), ln_w, ln_b, 1e-5))
        print("ok")
        """
    )


def test_per_row_bottleneck_stacks_equal_each_row_alone():
    """Rows routed to bottleneck stacks of several depths, structures and LayerNorm options (and to none) in one
    forward, served (no autograd) and training (the eager modules), equal each row run alone, and rows without an
    adapter equal the unpatched model; the fused twin equals the eager modules at every depth. (With
    ``original_ln_after=False`` a row without an adapter came out of a BERT output sublayer as its bare projection,
    without the residual and LayerNorm, in every backend.)"""
    run_plain(
        """
        import copy
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=99)
        bert = BertModel(config).eval()
        ids = torch.randint(0, 99, (4, 6))
        with torch.no_grad():
            plain = bert(input_ids=ids).last_hidden_state
        S = ae.BottleneckConfig
        configs = {
            "seq": S.seq_bn(reduction_factor=4),
            "double": S.double_seq_bn(reduction_factor=4),
            "par": S.par_bn(),
            "ln": S.seq_bn(reduction_factor=4, ln_before=True, ln_after=True, residual_before_ln=False),
            "no_ln_after": S.seq_bn(reduction_factor=4, adapter_residual_before_ln=True, original_ln_after=False),
        }
        for kind, cfg in configs.items():
            named = lambda message: f"{kind}: {message}"
            model = copy.deepcopy(bert)
            for level in ("a", "b"):
                ae.add_adapter(model, kind + level, cfg)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".adapters." in name:
                        p.normal_(0, 0.1)
            layers = [m for m in model.modules() if isinstance(m, ae.bottleneck.BottleneckStackLayer)]
            routes = [None, kind + "a", ae.Stack(kind + "a", kind + "b"), None]
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    with ae.use_adapters(routes):
                        mixed = model(input_ids=ids).last_hidden_state
                    for i, route in enumerate(routes):
                        with ae.use_adapters(route):
                            alone = model(input_ids=ids[i : i + 1]).last_hidden_state
                        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5, msg=named)
                        if route is None:
                            torch.testing.assert_close(alone, plain[i : i + 1], rtol=1e-5, atol=1e-5, msg=named)
            with torch.no_grad():
                for depth in (1, 2):
                    ae.set_active_adapters(model, ae.Stack(*[kind + level for level in "ab"[:depth]]))
                    fused = model(input_ids=ids).last_hidden_state
                    for layer in layers:
                        layer.fused = False
                    eager = model(input_ids=ids).last_hidden_state
                    for layer in layers:
                        layer.fused = True
                    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5, msg=named)
        print("ok")
        """
    )


def test_adapters_load_save_and_merge_as_peft_computes_them():
    """LoRA and IA3 adapters saved by PEFT load with PEFT's outputs (fp32, fp16, bf16) and LoRA gradients; saves load
    back in PEFT and in the engine (AdapterHub's format too); merges equal the unmerged adapters and the written-out
    weighted sum, exact unmerges and ``unpatch`` restore the model bit for bit."""
    run_plain(
        """
        import copy, os, tempfile
        import peft

        tmp = tempfile.mkdtemp()
        ids = torch.randint(0, 128, (3, 7))
        run = lambda model: model(input_ids=ids).last_hidden_state.float()
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
            base = llama().to(dtype)
            cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
            theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            theirs.save_pretrained(os.path.join(tmp, str(dtype)))
            ae.load_adapter(base, os.path.join(tmp, str(dtype)), name="x", set_active=True)
            torch.testing.assert_close(run(base), run(theirs), rtol=tol, atol=tol)
            if dtype == torch.float32:  # the LoRA factors' gradients
                ae.train_adapter(base, "x")
                ours = torch.autograd.grad(run(base).pow(2).sum(), ae.api.adapter_parameters(base, "x"))
                trained = [p for p in theirs.parameters() if p.requires_grad]
                ref = torch.autograd.grad(run(theirs).pow(2).sum(), trained)
                for g, r in zip(sorted(ours, key=torch.norm), sorted(ref, key=torch.norm)):
                    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

        plain = llama()
        with torch.no_grad():
            base_out = run(plain)
            cfg = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 init_ia3_weights=False)
            theirs = peft.get_peft_model(copy.deepcopy(plain), cfg).eval()
            for name, p in theirs.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
            theirs.save_pretrained(os.path.join(tmp, "ia3"))
            model = copy.deepcopy(plain)
            ae.load_adapter(model, os.path.join(tmp, "ia3"), name="i", set_active=True)
            torch.testing.assert_close(run(model), run(theirs), rtol=1e-5, atol=1e-5)
            ae.merge_adapter(model, "i")
            torch.testing.assert_close(run(model), run(theirs), rtol=1e-5, atol=1e-5)
            ae.unmerge_adapter(model, "i")
            torch.testing.assert_close(run(model), base_out, rtol=1e-5, atol=1e-5)

            model = copy.deepcopy(plain)
            for i, targets in enumerate((TARGETS, ["q_proj", "v_proj"])):
                ae.add_adapter(model, f"a{i}", ae.LoraConfig(r=4 + i, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights=False))
            ae.set_active_adapters(model, "a1")
            one = run(model)
            for fmt in ("peft", "adapterhub"):
                folder = ae.save_adapter(model, "a1", os.path.join(tmp, fmt), format=fmt)
                other = copy.deepcopy(plain)
                ae.load_adapter(other, folder, name="b", set_active=True)
                assert torch.equal(run(other), one), fmt
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), os.path.join(tmp, "peft")).eval()
            torch.testing.assert_close(run(theirs), one, rtol=1e-5, atol=1e-5)

            ae.set_active_adapters(model, ["a0", "a1"])
            both = run(model)
            q = model.layers[0].self_attn.q_proj
            want = q.weight + sum(w * q.scaling[n] * q.lora_B[n].weight @ q.lora_A[n].weight
                                  for n, w in (("a0", 0.5), ("a1", 2.0)))
            merged = copy.deepcopy(model)
            ae.merge_adapter(merged, ["a0", "a1"], weights=[0.5, 2.0])
            torch.testing.assert_close(merged.layers[0].self_attn.q_proj.weight, want, rtol=1e-6, atol=1e-6)
            dare = copy.deepcopy(model)
            ae.merge_adapter(dare, ["a0", "a1"], weights=[0.5, 2.0], combination="dare_linear", density=1.0)
            torch.testing.assert_close(run(dare), run(merged), rtol=1e-5, atol=1e-5)
            ae.merge_adapter(model, ["a0", "a1"], exact=True)
            assert ae.merged_adapters(model) == ["a0", "a1"]
            torch.testing.assert_close(run(model), both, rtol=1e-5, atol=1e-5)
            ae.unmerge_adapter(model)
            ae.unpatch(model)
            assert torch.equal(run(model), base_out)
            assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
        print("ok")
        """
    )


def test_a_peft_classifier_merges_into_plain_checkpoints():
    """A PEFT ``SEQ_CLS`` LoRA with its classifier (``modules_to_save``) runs with PEFT's logits and gradients, per
    row beside unadapted rows, saves back for PEFT, and merges into checkpoints plain ``transformers`` loads with the
    same logits: ``merge_adapter`` + ``save_model`` / ``load_model``, ``merge_checkpoint`` and the CLI's ``merge``."""
    run_plain(
        """
        import copy, os, tempfile
        import peft
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
        from adapter_engine.checkpoint import merge_checkpoint
        from adapter_engine.cli import main

        tmp = tempfile.mkdtemp()
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=99, num_labels=3)
        base = BertForSequenceClassification(config).eval()
        base.save_pretrained(os.path.join(tmp, "base"))
        batch = {"input_ids": torch.randint(0, 99, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
        batch["attention_mask"][1, 4:] = 0
        labels = torch.tensor([0, 1, 2, 1])
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                              init_lora_weights=False)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "modules_to_save" in name:
                    p.normal_(0, 0.5)
        theirs.save_pretrained(os.path.join(tmp, "lora"))
        model = copy.deepcopy(base)
        ae.load_adapter(model, os.path.join(tmp, "lora"), name="s", set_active=True)
        close = lambda got, want: torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            want = theirs(**batch).logits
            close(model(**batch).logits, want)
            with ae.use_adapters(["s", None, "s", None]):
                mixed = model(**batch).logits
            close(mixed[0::2], want[0::2])
            close(mixed[1::2], base(**batch).logits[1::2])

        ae.train_adapter(model, "s")
        trained = lambda m: [p for p in m.parameters() if p.requires_grad]
        ours = torch.autograd.grad(model(**batch, labels=labels).loss, trained(model))
        ref = torch.autograd.grad(theirs(**batch, labels=labels).loss, trained(theirs))
        assert len(ours) == len(ref) == 10
        for g, r in zip(sorted(ours, key=torch.norm), sorted(ref, key=torch.norm)):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

        saved = ae.save_adapter(model, "s", os.path.join(tmp, "ours"))
        with torch.no_grad():
            close(peft.PeftModel.from_pretrained(copy.deepcopy(base), saved).eval()(**batch).logits, want)
            ae.merge_adapter(model, "s")
            close(model(**batch).logits, want)
            folders = [ae.save_model(model, os.path.join(tmp, "merged"))]
            merge_checkpoint(os.path.join(tmp, "base"), saved, os.path.join(tmp, "streamed"), progress=False)
            folders.append(os.path.join(tmp, "streamed"))
            assert main(["merge", "--model", os.path.join(tmp, "base"), "--adapter", saved, "--out",
                         os.path.join(tmp, "cli")]) == 0
            folders.append(os.path.join(tmp, "cli"))
            close(ae.load_model(folders[0]).eval()(**batch).logits, want)
            for folder in folders:
                close(AutoModelForSequenceClassification.from_pretrained(folder).eval()(**batch).logits, want)
        print("ok")
        """
    )


def test_stack_and_adapt_trains_serves_and_reloads():
    """``StackedAdapterModel``: training a level moves only it (and the head), rows at several depths in one batch
    equal those depths run alone, a saved stack and an ``AdapterStore`` under ``max_active=1`` (adapters dropped and
    reloaded) give the same logits, and ``GraphedServer`` refuses CPU inputs with the way out named."""
    run_plain(
        """
        import os, tempfile
        from transformers import BertConfig, BertForSequenceClassification

        tmp = tempfile.mkdtemp()
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=99, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        def new_base():  # the same random base every time
            torch.manual_seed(1)
            return BertForSequenceClassification(config).eval()

        sam = ae.StackedAdapterModel(new_base())
        batch = {"input_ids": torch.randint(0, 99, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
        labels = torch.tensor([0, 1, 2, 1])
        for level, kind, head in (("l1", "seq_bn", True), ("l2", "seq_bn", False)):
            sam.add_adapter(level, kind)
            sam.train_adapter(level, train_head=head)
            trained = [n for n, p in sam.named_parameters() if p.requires_grad]
            assert all(f".{level}." in n or n.startswith("model.classifier.") for n in trained), trained
            assert any(n.startswith("model.classifier.") for n in trained) == head
            before = {n: p.detach().clone() for n, p in sam.named_parameters()}
            opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.5)
            for _ in range(2):
                sam(**batch, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad()
            changed = {n for n, p in sam.named_parameters() if not torch.equal(p, before[n])}
            assert changed == set(trained), changed ^ set(trained)
        sam.add_adapter("sib", "seq_bn", level=False)
        with torch.no_grad():
            for name, p in sam.named_parameters():  # (two small steps barely move the levels' zero-init up projections)
                if ".adapters." in name:
                    p.normal_(0, 0.5)
            depths = []
            for depth in (0, 1, 2):
                sam.set_depth(depth)
                depths.append(sam(**batch).logits)
            assert (depths[2] - depths[1]).abs().max() > 1e-2 and (depths[1] - depths[0]).abs().max() > 1e-2
            routes = ["l2", None, "l1", "sib"]
            mixed = sam(**batch, adapter=routes).logits
            for i, depth in ((0, 2), (1, 0), (2, 1)):
                torch.testing.assert_close(mixed[i], depths[depth][i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed[3:], sam(**{k: v[3:] for k, v in batch.items()}, adapter="sib").logits,
                                       rtol=1e-5, atol=1e-5)
            sam.set_depth(2)
            folder = sam.save(os.path.join(tmp, "stack"))
            loaded = ae.StackedAdapterModel.load(folder, new_base())
            torch.testing.assert_close(loaded(**batch).logits, depths[2], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(loaded(**batch, adapter=routes).logits, mixed, rtol=1e-6, atol=1e-6)
            lazy = ae.StackedAdapterModel(new_base(), store=folder, max_active=1, offload="drop")
            lazy.model.classifier.load_state_dict(sam.model.classifier.state_dict())
            for route in ("sib", "l1", "sib", "l1"):
                want = mixed[3] if route == "sib" else mixed[2]
                torch.testing.assert_close(lazy(**batch, adapter=route).logits[2 if route == "l1" else 3], want,
                                           rtol=1e-5, atol=1e-5)
            stats = lazy.memory.stats()
            assert stats.evictions == 3 and stats.loads_from_disk == 4 and stats.resident == 1, stats
        try:
            ae.GraphedServer.for_stacked(sam)(routes, **batch)
        except ValueError as err:
            assert "CUDA inputs" in str(err) and "use_adapters" in str(err), err
        else:
            raise AssertionError("GraphedServer ran on CPU inputs")
        print("ok")
        """
    )
