"""s1fast.model.patch / unpatch / load against transformers' own Qwen2 and Qwen3 models.

Reference: the same model unpatched (transformers' code), and the unpatched model in float64 where bf16 is
judged. The kernels run their PyTorch path (fast) except in the Triton test, which runs them through the
interpreter (conftest sets TRITON_INTERPRET=1 without a GPU).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import types

import pytest
import torch
from tiny_qwen import VOCAB, random_batch, tiny_model
from torch import nn
from transformers.models.qwen2 import modeling_qwen2

from s1fast.kernels import force_backend
from s1fast.model.patch import load, patch, unpatch

patch_module = importlib.import_module("s1fast.model.patch")  # the package exports the function `patch` too

# fp32: patched and unpatched do the same math in fp32, in a different order (fused / chunked reductions), so
# results differ by rounding: a few 1e-7 relative per op, a few 1e-6 after two layers forward and backward.
# 1e-5 of the largest magnitude leaves margin for that, while a semantic slip (a missed shift, epsilon, weight,
# scale or mask) moves results by 1e-3 or more.
FP32_REL = 1e-5


@pytest.fixture(autouse=True)
def _torch_kernels():
    with force_backend("torch"):
        yield


def assert_rel(actual, expected, rel, what):
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


def patched_pair(arch="qwen2", *, tied=True, dtype=torch.float32, **config):
    ref = tiny_model(arch, tied=tied, dtype=dtype, **config)
    return ref, patch(copy.deepcopy(ref))


def loss_and_grads(model, input_ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels, **kwargs)
    out.loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # the compiled model's own names
    return out, {n: p.grad for n, p in params if p.requires_grad}


def assert_same_training(ref, patched, input_ids, labels, rel=FP32_REL, **kwargs):
    out_ref, g_ref = loss_and_grads(ref, input_ids, labels, **kwargs)
    out, g = loss_and_grads(patched, input_ids, labels, **kwargs)
    assert out.logits is None, "training with labels must not build logits"
    assert_rel(out.loss, out_ref.loss, rel, "loss")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert_rel(g[name], g_ref[name], rel, f"grad of {name}")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "grad_ckpt"])
def test_loss_logits_and_every_grad_match_transformers_fp32(arch, tied, checkpointing):
    ref, patched = patched_pair(arch, tied=tied)
    if checkpointing:
        ref.gradient_checkpointing_enable()
        patched.gradient_checkpointing_enable()
    input_ids, labels = random_batch(2, 17)
    assert_same_training(ref, patched, input_ids, labels)
    ref.eval(), patched.eval()
    with torch.no_grad():
        assert_rel(patched(input_ids=input_ids).logits, ref(input_ids=input_ids).logits, FP32_REL, "eval logits")
        eval_ref, eval_patched = ref(input_ids=input_ids, labels=labels), patched(input_ids=input_ids, labels=labels)
    assert_rel(eval_patched.logits, eval_ref.logits, FP32_REL, "eval logits with labels")
    assert_rel(eval_patched.loss, eval_ref.loss, FP32_REL, "eval loss")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_bf16_is_as_close_to_float64_as_transformers(arch):
    """bf16 rounding differs between fused and unfused code, so the two bf16 runs are compared with the float64
    run of the same weights: the patched model's error must stay within twice transformers' own bf16 error
    (the fused kernels round fewer intermediates, so they are usually closer)."""
    ref64 = tiny_model(arch, dtype=torch.float64)
    ref16, patched16 = patched_pair(arch, dtype=torch.bfloat16)
    input_ids, labels = random_batch(2, 24)
    out64, g64 = loss_and_grads(ref64, input_ids, labels)
    out_ref, g_ref = loss_and_grads(ref16, input_ids, labels)
    out, g = loss_and_grads(patched16, input_ids, labels)

    def rel_err(x, x64):
        return ((x.double() - x64).norm() / x64.norm()).item()

    # bf16 keeps 8 bits: a relative error of a few 1e-3 is one rounding; the 2e-3 floor covers quantities where
    # transformers happens to round luckily. Measured: both at 1e-2..3e-2 on gradients, ratio about 1.
    assert rel_err(out.loss, out64.loss) <= 2 * rel_err(out_ref.loss, out64.loss) + 2e-3
    for name in g64:
        ours, theirs = rel_err(g[name], g64[name]), rel_err(g_ref[name], g64[name])
        assert ours <= 2 * theirs + 2e-3, f"grad of {name}: bf16 error {ours:.3g} vs transformers' {theirs:.3g}"


def test_every_module_runs_the_fused_kernels(monkeypatch):
    """Counts the kernel calls of one Qwen3 forward: RMSNorm 2 per layer + q/k norms 2 per layer + final norm,
    rope and SwiGLU once per layer, the fused loss once, and nothing through transformers' rope."""
    calls = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(patch_module, name, wrapper)

    for name in ("rms_norm", "apply_rope", "swiglu", "fused_linear_cross_entropy"):
        counting(name, getattr(patch_module, name))
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", None)  # Qwen3 must not reach transformers' rope
    from transformers.models.qwen3 import modeling_qwen3

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", None)
    _, model = patched_pair("qwen3", layers=3)
    input_ids, labels = random_batch(1, 9)
    model(input_ids=input_ids, labels=labels)
    assert calls == {"rms_norm": 3 * 4 + 1, "apply_rope": 3, "swiglu": 3, "fused_linear_cross_entropy": 1}


def test_triton_kernels_through_the_interpreter():
    """The same comparison with the Triton kernels (interpreter on CPU; tiny shapes keep it quick)."""
    ref, patched = patched_pair("qwen3", layers=1)
    input_ids, labels = random_batch(1, 8)
    with force_backend("triton"):
        assert_same_training(ref, patched, input_ids, labels)


def test_adamw_steps_stay_together():
    """Ten AdamW steps on fresh batches: losses and the trained weights track transformers' (rounding
    differences may grow a little through the updates, hence 1e-4)."""
    ref, patched = patched_pair("qwen2", tied=True)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4) for m in (ref, patched)]
    losses = []
    for step in range(10):
        input_ids, labels = random_batch(2, 16, seed=100 + step % 3)
        pair = []
        for model, opt in zip((ref, patched), opts):
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            pair.append(loss.detach())
        assert_rel(pair[1], pair[0], 1e-4, f"loss at step {step}")
        losses.append(pair[1])
    assert losses[-1] < 0.8 * losses[0], f"training did not progress: {losses[0]:.3f} -> {losses[-1]:.3f}"
    for (name, p), p_ref in zip(patched.named_parameters(), ref.parameters()):
        assert_rel(p, p_ref, 1e-4, f"{name} after 10 steps")


def test_packed_sequences_match_separate_sequences():
    """Three sequences packed into one row (position_ids restarting at 0, no attention mask: transformers
    builds a block-diagonal mask from position_ids) give each sequence's own loss and the summed gradients.

    transformers 5 detects packing only without a KV cache: in train mode ``use_cache`` still defaults to
    config.use_cache (True), which makes a DynamicCache and silently attends across sequences, so padding-free
    training must pass use_cache=False (or set config.use_cache = False)."""
    _, model = patched_pair("qwen2")
    lengths = (5, 9, 4)
    seqs = [random_batch(1, n, seed=10 + i, prompt=2) for i, n in enumerate(lengths)]
    packed_ids = torch.cat([ids for ids, _ in seqs], 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    # the first label of every sequence is -100: nothing predicts it across the boundary
    packed_labels = torch.cat([torch.cat([torch.tensor([[-100]]), lab[:, 1:]], 1) for _, lab in seqs], 1)
    starts = torch.tensor((0,) + lengths).cumsum(0)

    separate_grads = None
    for i, (ids, lab) in enumerate(seqs):
        only_i = torch.full_like(packed_labels, -100)
        only_i[:, starts[i] : starts[i + 1]] = packed_labels[:, starts[i] : starts[i + 1]]
        packed = model(input_ids=packed_ids, position_ids=position_ids, labels=only_i, use_cache=False).loss
        _, grads = loss_and_grads(model, ids, lab, num_items_in_batch=1)  # summed loss: gradients add up
        alone = model(input_ids=ids, labels=lab).loss
        assert_rel(packed, alone, FP32_REL, f"loss of sequence {i} packed vs alone")
        separate_grads = grads if separate_grads is None else {n: g + grads[n] for n, g in separate_grads.items()}
    _, packed_grads = loss_and_grads(
        model, packed_ids, packed_labels, position_ids=position_ids, use_cache=False, num_items_in_batch=1
    )
    for name, g in separate_grads.items():
        assert_rel(packed_grads[name], g, FP32_REL, f"grad of {name} packed vs separate")


def test_num_items_in_batch_and_logits_to_keep():
    ref, patched = patched_pair("qwen2", tied=False)
    input_ids, labels = random_batch(2, 12)
    # gradient accumulation: sum over tokens / num_items_in_batch (a tensor, as transformers' Trainer passes it)
    assert_same_training(ref, patched, input_ids, labels, num_items_in_batch=torch.tensor(37))
    # labels for the kept positions only, as transformers would accept them
    assert_same_training(ref, patched, input_ids, labels[:, -5:], logits_to_keep=5)
    with torch.no_grad():
        for keep in (1, 4, torch.tensor([0, 3, 7])):
            logits = patched(input_ids=input_ids, logits_to_keep=keep).logits  # training mode, no labels
            assert_rel(logits, ref(input_ids=input_ids, logits_to_keep=keep).logits, FP32_REL, f"logits_to_keep={keep}")


def test_positional_arguments_and_the_cache_through_the_fused_loss():
    """The fused forward takes positional arguments in the installed class's order and returns the cache the
    model made, whatever this transformers release calls it (``past_key_values`` before 5.24, ``cache`` since)."""
    ref, patched = patched_pair("qwen2")
    input_ids, labels = random_batch(2, 9)
    mask = torch.ones_like(input_ids)
    positional = inspect.signature(patched.forward).parameters  # what Trainer sees: the installed signature
    assert list(positional)[:2] == ["input_ids", "attention_mask"] and "labels" in positional
    out = patched(input_ids, mask, labels=labels, use_cache=True)
    out_ref = ref(input_ids, mask, labels=labels, use_cache=True)
    assert out.logits is None
    assert_rel(out.loss, out_ref.loss, FP32_REL, "loss with positional arguments")
    cache, cache_ref = out.to_tuple()[1], out_ref.to_tuple()[2]  # (loss, cache) vs (loss, logits, cache)
    assert type(cache) is type(cache_ref) and cache.get_seq_length() == 9
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        patched(input_ids, input_ids=input_ids, labels=labels)


def _counting_decorator(counter: list):
    """A decorator like transformers' ``deprecate_kwarg``: ``functools.wraps`` over a closure, with behaviour of
    its own (counts calls, renames a keyword)."""

    def decorate(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            counter.append(1)
            if "old_mask" in kwargs:
                kwargs["attention_mask"] = kwargs.pop("old_mask")
            return func(*args, **kwargs)

        return wrapped

    return decorate


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_rope_patch_sees_through_decorated_attention_forwards(arch, monkeypatch):
    """Attention classes whose forward is wrapped (once more on top of whatever this transformers release
    already wraps it in) still get s1fast's rope, the wrapper still runs, and the results match transformers."""
    ref, model = patched_pair(arch)
    unpatch(model)
    attention = type(model.model.layers[0].self_attn)
    counter = []
    decorated = type("DecoratedAttention", (attention,), {"forward": _counting_decorator(counter)(attention.forward)})
    for layer in model.model.layers:
        layer.self_attn.__class__ = decorated
    rope_calls = []
    apply_rope = patch_module.apply_rope
    monkeypatch.setattr(patch_module, "apply_rope", lambda *a: rope_calls.append(1) or apply_rope(*a))
    patch(model)
    input_ids, labels = random_batch(2, 11)
    assert_same_training(ref, model, input_ids, labels)
    layers = len(model.model.layers)
    assert len(counter) == layers and len(rope_calls) == layers, "the wrapper and s1fast's rope run once per layer"
    unpatch(model)
    assert decorated.forward.__wrapped__ is attention.forward, "the class's own forward is untouched"


def test_rope_patch_refuses_a_decorator_it_cannot_see_through():
    def opaque(func):  # wraps without keeping the function in its closure
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            return wrapped.__wrapped__(*args, **kwargs)

        return wrapped

    _, model = patched_pair("qwen2")
    unpatch(model)
    attention = type(model.model.layers[0].self_attn)
    model.model.layers[0].self_attn.__class__ = type("Opaque", (attention,), {"forward": opaque(attention.forward)})
    with pytest.raises(RuntimeError, match="cannot see through the decorator .* rope=False"):
        patch(model)
    patch(model, rope=False)  # the way out the message names


def test_unpatch_restores_bit_identical_outputs_and_other_models_are_untouched():
    ref, model = patched_pair("qwen3", tied=False)
    bystander = copy.deepcopy(ref)  # another instance of the same classes in this process
    input_ids, labels = random_batch(2, 10)
    patched_out, _ = loss_and_grads(model, input_ids, labels)
    bystander_out, bystander_grads = loss_and_grads(bystander, input_ids, labels)
    ref_out, ref_grads = loss_and_grads(ref, input_ids, labels)
    assert torch.equal(bystander_out.logits, ref_out.logits) and torch.equal(bystander_out.loss, ref_out.loss)
    assert all(torch.equal(bystander_grads[n], g) for n, g in ref_grads.items())
    assert patched_out.logits is None

    assert unpatch(model) is model
    assert not any("forward" in vars(m) for m in model.modules()), "unpatch left an instance forward behind"
    out, grads = loss_and_grads(model, input_ids, labels)
    assert torch.equal(out.logits, ref_out.logits) and torch.equal(out.loss, ref_out.loss)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_patch_twice_and_switches():
    ref, model = patched_pair("qwen2")
    input_ids, labels = random_batch(2, 10)
    assert patch(model) is model  # again: same result
    assert_same_training(ref, model, input_ids, labels)
    patch(model, loss=False, rope=False)  # re-patching replaces the switches
    assert "forward" not in vars(model) and "forward" not in vars(model.model.layers[0].self_attn)
    assert "forward" in vars(model.model.norm) and "forward" in vars(model.model.layers[1].mlp)
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits is not None
    assert_rel(out.loss, ref(input_ids=input_ids, labels=labels).loss, FP32_REL, "loss with loss=False")


def test_generate_after_patch():
    ref, model = patched_pair("qwen2")
    ref.eval(), model.eval()
    prompt = random_batch(2, 6)[0]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, **kwargs)
    assert out.shape == (2, 14)
    assert torch.equal(out, ref.generate(prompt, **kwargs))


def test_torch_compile():
    """Dynamo traces the instance-level forwards and autograd through them; the aot_eager backend keeps CPU
    compile time small (inductor would add C++ builds, not coverage of the patch)."""
    ref, model = patched_pair("qwen3", layers=1)
    compiled = torch.compile(model, backend="aot_eager")
    input_ids, labels = random_batch(2, 12)
    assert_same_training(ref, compiled, input_ids, labels)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_torch_compile_fullgraph_without_recompiles(arch):
    """fullgraph torch.compile of a patched model, in eval (logits) and in training (the fused loss), with the
    installed transformers: on 5.25 with the `kernels` package, transformers' apply_rotary_pos_emb is a Hub-kernel
    `Func` module, and Dynamo must guard the rope that the patched attention really calls. A second batch of the
    same shape must reuse the graph (error_on_recompile)."""
    ref, model = patched_pair(arch, layers=1)
    batches = [random_batch(2, 12, seed=seed) for seed in (1, 2)]
    torch._dynamo.reset()  # graphs of other tests share transformers' wrapper code objects
    ref.eval()
    model.eval()
    forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for input_ids, _ in batches:
            assert_rel(forward(input_ids).logits, ref(input_ids).logits, FP32_REL, "compiled logits")
    torch._dynamo.reset()  # the training graph is a new compilation, not a recompile of the no-grad one
    ref.train()
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for input_ids, labels in batches:
            assert_same_training(ref, compiled, input_ids, labels)


def test_patches_survive_transformers_rekernelization_and_report(tmp_path, monkeypatch):
    """transformers >= 5.25 kernelizes every model in from_pretrained (use_kernels defaults on when the `kernels`
    package is installed) and again at each train()/eval() switch, which pops the RMSNorm instance forwards. Load
    weights through s1fast.model.load, switch to training, and count the RMSNorm kernel calls of one forward: every
    norm must still run s1fast's kernel. A kernelization forced after patch() is reported, not silent."""
    tiny_model("qwen2", layers=2).save_pretrained(tmp_path)
    model = load(str(tmp_path), dtype=torch.float32)
    installed = patch_module.patched(model)
    assert installed == {"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}, installed  # 2 layers x 2 + final
    model.train()
    calls = []
    kernel = patch_module.rms_norm
    monkeypatch.setattr(patch_module, "rms_norm", lambda *a: calls.append(1) or kernel(*a))
    input_ids, labels = random_batch(2, 12)
    model(input_ids=input_ids, labels=labels)
    assert len(calls) == 5, f"{len(calls)} of 5 RMSNorm modules ran s1fast's kernel"
    assert patch_module.patched(model) == installed
    if importlib.util.find_spec("kernels") is None or not hasattr(model, "reset_kernels"):
        return  # transformers without Hub kernels: nothing can re-kernelize the model
    model.use_kernels = True  # the user turns Hub kernels back on: the RMSNorm forwards go, and it is said
    model.eval()
    model.train()
    # (the MLPs go too once s1fast.model.hub_kernels has named Qwen's MLP classes a Hub layer, SwiGLU)
    with pytest.warns(UserWarning, match=r"replaced s1fast forwards after patch\(\): \{'rms_norm': 5[,}]"):
        model(input_ids=input_ids, labels=labels)
    patch(model)
    assert patch_module.patched(model) == installed and not model.use_kernels


def test_peft_lora_on_patched_model():
    peft = pytest.importorskip("peft")
    config = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def lora(model):
        model = peft.get_peft_model(model, peft.LoraConfig(**config))
        for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapters do something
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return model

    ref = tiny_model("qwen2")
    torch.manual_seed(5)
    ref_lora = lora(copy.deepcopy(ref))
    torch.manual_seed(5)
    patched_first = lora(patch(copy.deepcopy(ref)))  # patch, then add adapters
    torch.manual_seed(5)
    patched_after = patch(lora(copy.deepcopy(ref)))  # add adapters, then patch the PEFT model
    input_ids, labels = random_batch(2, 12)
    for model in (patched_first, patched_after):
        assert_same_training(ref_lora, model, input_ids, labels)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_trainer_smoke(tmp_path):
    """transformers' Trainer, 2 steps with gradient accumulation (it passes num_items_in_batch): the same
    logged losses and trained weights as the unpatched model."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    rows = []
    for i in range(8):
        ids, lab = random_batch(1, 12, seed=40 + i, prompt=1 + i % 5)  # different label counts per example
        rows.append({"input_ids": ids[0], "labels": lab[0]})

    def train(model, name):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log])
        return losses, model.state_dict()

    ref, model = patched_pair("qwen2")
    ref_losses, ref_state = train(ref, "ref")
    losses, state = train(model, "patched")
    assert len(ref_losses) == 2
    assert_rel(losses, ref_losses, 1e-5, "logged losses")
    for name, p in state.items():
        assert_rel(p, ref_state[name], 1e-4, f"{name} after Trainer")


def test_load_from_save_pretrained(tmp_path):
    ref = tiny_model("qwen2", tied=True)
    ref.save_pretrained(tmp_path)
    model = load(str(tmp_path), dtype=torch.float32, device="cpu")
    assert model.config._attn_implementation == "sdpa"  # "auto" on CPU
    assert not model.training and model.dtype == torch.float32
    assert "forward" in vars(model) and "forward" in vars(model.model.layers[0].self_attn)
    model.train()
    assert_same_training(ref, model, *random_batch(2, 10))

    partial = load(str(tmp_path), dtype=torch.float32, attn="eager", loss=False)
    assert partial.config._attn_implementation == "eager" and "forward" not in vars(partial)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load(str(tmp_path), dtype=torch.float32, fused=True)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match=r"Qwen2ForCausalLM, Qwen3ForCausalLM.*got Linear"):
        patch(nn.Linear(4, 4))
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(TypeError, match="got LlamaForCausalLM"):
        patch(llama)
    with pytest.raises(TypeError, match="got OptimizedModule"):
        patch(torch.compile(tiny_model()))
    with pytest.raises(ValueError, match="hidden_act"):
        patch(tiny_model(hidden_act="gelu"))
    patch(tiny_model(hidden_act="gelu"), swiglu=False)

    model = patch(tiny_model())
    input_ids, labels = random_batch(2, 10)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 10\).*got \(2, 9\)"):
        model(input_ids=input_ids, labels=labels[:, 1:])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(input_ids=input_ids, labels=labels.reshape(-1))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(input_ids=input_ids, labels=labels.float())
    with pytest.raises(ValueError, match="shift_labels must have shape"):
        model(input_ids=input_ids, labels=labels, shift_labels=labels[:1])

    foreign = tiny_model()
    norm = foreign.model.norm
    norm.forward = types.MethodType(lambda self, x: x, norm)  # e.g. an accelerate hook
    with pytest.raises(ValueError, match=r"'model.norm' already has an instance-level forward"):
        patch(foreign)
    assert not any("forward" in vars(m) for m in foreign.modules() if m is not norm), "failed patch left changes"
