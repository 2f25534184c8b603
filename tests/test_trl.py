"""s1fast.train.trl_head: TRL's fused-LM-head protocol from s1fast's kernel, against TRL's own head and float64.

References: TRL's ``add_fused_lm_head`` on the same model (its chunked log-prob kernel, fp32 math), the model's own
full logits in float64, and ``SFTTrainer`` without s1fast. The s1fast kernels run through Triton's interpreter on
CPU (conftest), TRL's through its PyTorch tiles.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_qwen import VOCAB, random_batch, tiny_model

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
s1trl = pytest.importorskip("s1fast.train.trl_head")

from datasets import Dataset  # noqa: E402  (a dependency of trl)
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast, set_seed  # noqa: E402

from s1fast.model import patch  # noqa: E402

# fp32 against fp32: TRL and s1fast compute the same logits and softmax statistics in fp32, in different orders
# (TRL: 32K-wide vocabulary tiles, s1fast: one row sweep), so per-token values differ by a few 1e-7 relative and the
# gradients, summed over ~100 tokens and two layers, by a few 1e-6. 2e-5 of the largest magnitude leaves margin; a
# semantic slip (shift, mask, temperature, scale) moves results by 1e-2 or more.
FP32_REL = 2e-5
# float64 model against its own float64 logits: only the fp32 row statistics of the kernel round (1e-7 relative).
FP64_REL = 1e-6


def assert_rel(actual, expected, rel, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


def counting(monkeypatch, owner, name):
    """Replace ``owner.name`` by a wrapper that counts its calls (and records their keyword arguments)."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def fused_call(model, input_ids, labels, weights, **kwargs):
    """The fused forward, then backward of sum(weights * log_probs); returns the output and every gradient."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True, **kwargs)
    ((out.log_probs * weights).sum() + out.loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_protocol_matches_trl_and_float64(arch, temperature, monkeypatch):
    """Per-token log-probs (with per-token gradient weights: the exact path), entropy, top-1, label mask and loss
    as TRL's head on the same model, with temperature, shift_labels and num_items_in_batch; and in float64 as the
    model's own logits."""
    input_ids, labels = random_batch(2, 12, seed=3)
    weights = torch.rand(2, 11, generator=torch.Generator().manual_seed(4))
    ref = tiny_model(arch)
    ours = copy.deepcopy(ref)
    trl_utils.add_fused_lm_head(ref, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
    s1trl.add_fused_lm_head(ours, temperature=temperature)
    calls = counting(monkeypatch, s1trl, "fused_linear_cross_entropy")
    expected, ref_grads = fused_call(ref, input_ids, labels, weights, num_items_in_batch=17)
    actual, grads = fused_call(ours, input_ids, labels, weights, num_items_in_batch=17)
    assert len(calls) == 1 and calls[0]["uniform_grad"] is False
    torch.testing.assert_close(actual.label_mask, expected.label_mask, rtol=0, atol=0)
    torch.testing.assert_close(actual.is_top1, expected.is_top1, rtol=0, atol=0)
    for field in ("loss", "log_probs", "entropy"):
        assert_rel(getattr(actual, field), getattr(expected, field), FP32_REL, field)
    for name, grad in ref_grads.items():
        assert_rel(grads[name], grad, FP32_REL, name)
    # shift_labels are scored as given
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    out = ours(input_ids=input_ids, shift_labels=shifted, fused_lm_head=True)
    assert out.log_probs.shape == shifted.shape
    assert_rel(out.log_probs[:, :-1], actual.log_probs, 1e-6, "shift_labels")
    # float64: the model's own full logits
    model64 = tiny_model(arch, dtype=torch.float64)
    s1trl.add_fused_lm_head(model64, temperature=temperature)
    out = model64(input_ids=input_ids, labels=labels, fused_lm_head=True)
    logits = model64(input_ids=input_ids).logits[:, :-1] / temperature
    logp = logits.log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    want = torch.where(mask, logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)
    assert_rel(out.log_probs, want, FP64_REL, "log_probs vs float64")
    assert_rel(out.entropy, entropy, FP64_REL, "entropy vs float64")
    assert torch.equal(out.is_top1, mask & (logits.argmax(-1) == target))
    assert_rel(out.loss, -want.sum() / mask.sum(), FP64_REL, "loss vs float64")


def test_uniform_grad_refuses_weighted_tokens():
    """The gradient-in-forward path (SFT) gives NaN gradients, never wrong ones, when tokens are weighted."""
    model = s1trl.add_fused_lm_head(tiny_model(), uniform_grad=True)
    input_ids, labels = random_batch(2, 12, seed=5)
    out, grads = fused_call(model, input_ids, labels, torch.zeros(2, 11))  # uniform: exact
    ref = copy.deepcopy(model)
    assert all(torch.isfinite(g).all() for g in grads.values())
    _, bad = fused_call(ref, input_ids, labels, torch.rand(2, 11))
    assert torch.isnan(bad["lm_head.weight" if "lm_head.weight" in bad else "model.embed_tokens.weight"]).any()


def tiny_tokenizer():
    """A word-level tokenizer over TINY's vocabulary (ids 0..VOCAB-1), pad id 0."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t2")


def tiny_dataset(n=8, seed=0):
    """Pre-tokenized prompt + completion rows: loss only on the completion (completion_mask)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(3, 9, (2,), generator=g))
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion})
    return Dataset.from_list(rows)


def sft_trainer(model, tmp_path, **args):
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                           logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                           dataloader_num_workers=0, bf16=False, **args)  # fp32: TRL's default bf16 autocast
    # would make both heads round their logits to bf16 (4e-3 relative), hiding a real difference under rounding
    return trl.SFTTrainer(model=model, args=config, train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())


@pytest.mark.parametrize("arch,loss_type", [("qwen2", "nll"), ("qwen3", "nll"), ("qwen2", "dft")])
def test_sft_trainer_matches_trl(arch, loss_type, tmp_path, monkeypatch):
    """SFTTrainer on a patched tiny model with s1fast's head: loss, mean_token_accuracy, entropy and gradients of
    one batch, then three logged training steps, as SFTTrainer alone; s1fast's kernel really runs (counted) and
    TRL's does not."""
    model = tiny_model(arch)
    ref = sft_trainer(copy.deepcopy(model), tmp_path / "ref", loss_type=loss_type)
    ours = s1trl.use_s1fast_lm_head(sft_trainer(patch(copy.deepcopy(model)), tmp_path / "ours", loss_type=loss_type))
    batch = next(iter(ref.get_train_dataloader()))
    grads = []
    for trainer in (ref, ours):
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name, grad in grads[0].items():
        assert_rel(grads[1][name], grad, FP32_REL, name)
    for trainer in (ref, ours):
        trainer._metrics["train"].clear()
        trainer.model.zero_grad(set_to_none=True)

    s1fast_calls = counting(monkeypatch, s1trl, "fused_linear_cross_entropy")
    trl_calls = counting(monkeypatch, trl_utils._ChunkedLogProbFunction, "apply")
    set_seed(0)  # the same batch order in both runs
    ref.train()
    assert len(trl_calls) == 3 and not s1fast_calls
    trl_calls.clear()
    set_seed(0)
    ours.train()
    assert len(s1fast_calls) == 3 and not trl_calls
    assert all(call["uniform_grad"] is (loss_type == "nll") for call in s1fast_calls)
    logs = [[row for row in t.state.log_history if "loss" in row] for t in (ref, ours)]
    assert len(logs[0]) == len(logs[1]) == 3
    for want, got in zip(*logs):
        for key in ("loss", "mean_token_accuracy", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, want, got)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_add_fused_lm_head_names_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        s1trl.add_fused_lm_head(tiny_model("qwen2"), temperature)


def test_use_s1fast_lm_head_refuses_other_trainers():
    with pytest.raises(TypeError, match="SFTTrainer"):
        s1trl.use_s1fast_lm_head(object())


# -------------------------------------------------------------- s1fast's kernel against TRL's on the same inputs
def sft_head(impl, hidden, weight, labels):
    """SFTTrainer's loss on the LM head (-mean log-prob of the non-ignored rows, only those scored) and the
    per-token log-probs, through s1fast's kernel (as ``use_s1fast_lm_head`` calls it) or TRL's."""
    mask = labels != -100
    h, y = hidden[mask], labels[mask]
    if impl == "s1fast":
        log_probs = -fused_linear_cross_entropy(h, weight, y, reduction="none", uniform_grad=True)
    else:
        log_probs = trl_chunked.ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, TRL_VOCAB_TILE, None, 1.0,
                                                             ("log_probs", "entropy", "is_top1"))[0]
    return -log_probs.sum() / mask.sum(), log_probs


trl_chunked = pytest.importorskip("trl.kernels.chunked_logprob")
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
from s1fast.bench import perf_model  # noqa: E402
from s1fast.kernels import fused_linear_cross_entropy, interpreting  # noqa: E402


@pytest.mark.skipif(not interpreting(), reason="runs both heads' Triton kernels through the interpreter (CPU CI)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_against_trl_float64_and_bytes(dtype, monkeypatch):
    """The measurement behind bench/README.md's TRL section, on one input: loss, log-probs and gradients of both
    heads against float64, and the bytes their logits kernels move (counted under the interpreter; TRL's Triton
    path forced on CPU tensors) against the minimum of one read of the logits and one write of their gradient.
    ``other_kernels_mib``: s1fast's scaling of the finished [V, H] / [N, H] gradients by grad_output (TRL has none
    on the Triton side: it accumulates in fp32 GEMMs and casts in PyTorch)."""
    monkeypatch.setattr(trl_chunked, "_use_triton", lambda device: True)
    g = torch.Generator().manual_seed(11)
    N, H, V = 40, 32, 40000  # two of TRL's 32K vocabulary tiles
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2 / H**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    rows = int((labels != -100).sum())
    h64, w64 = (t.double().requires_grad_() for t in (hidden, weight))
    loss64, logp64 = sft_head("s1fast", h64, w64, labels)  # float64 runs the kernels' PyTorch path: exact math
    grads64 = torch.autograd.grad(loss64, (h64, w64))
    report = {}
    for impl in ("s1fast", "trl"):
        with perf_model.counting() as launches:  # bytes only: counting() skips the scaling kernel s1fast launches
            h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
            sft_head(impl, h, w, labels)[0].backward()
        logits_kernels = ("_cross_entropy_kernel", "_forward_kernel", "_backward_kernel")
        moved = sum(x["load_bytes"] + x["store_bytes"] for x in launches if x["kernel"] in logits_kernels)
        other = sum(x["load_bytes"] + x["store_bytes"] for x in launches if x["kernel"] not in logits_kernels)
        h, w = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight))
        loss, logp = sft_head(impl, h, w, labels)
        loss.backward()
        errs = [((a.double() - b).abs().max() / b.abs().max()).item()
                for a, b in ((loss, loss64), (logp, logp64), (h.grad, grads64[0]), (w.grad, grads64[1]))]
        report[impl] = dict(zip(("loss", "log_probs", "grad_hidden", "grad_weight"), errs),
                            bytes_per_row_over_min=moved / (rows * 2 * V * dtype.itemsize),
                            other_kernels_mib=other / 2**20)
    print(f"\n{dtype}: {report}")
    rel = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits GEMM rounds to bf16
    for impl, r in report.items():
        assert max(r["loss"], r["log_probs"], r["grad_hidden"], r["grad_weight"]) < rel, (impl, r)
    # s1fast: sweep 1 reads, sweep 2 reads and writes (3 V s = 1.5x), per-row scalars on top. TRL: forward reads each
    # tile (V s, in fp32 scalars per row), backward reads and writes it (2 V s): 1.5x too, but after a second GEMM
    assert 1.5 <= report["s1fast"]["bytes_per_row_over_min"] < 1.51
    assert 1.5 <= report["trl"]["bytes_per_row_over_min"] < 1.52
