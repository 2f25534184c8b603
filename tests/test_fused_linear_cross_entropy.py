"""fused_linear_cross_entropy against float64 references and transformers' causal-LM loss, on the Triton
(interpreter) and PyTorch paths, with one and many chunks.

Tolerances, relative to the largest reference magnitude: fp32 1e-5 (fp32 GEMMs over H <= 64 and an fp32
softmax: rounding ~6e-8 per operation, a few hundred accumulated); bf16 2e-2 against a float64 reference
on the same bf16 inputs: the logits and their gradient are rounded to bf16 (2^-9 ~ 2e-3 relative each)
before the two backward GEMMs, and those roundings compound over H- and V-long sums. Against transformers
in bf16 (which rounds the logits the same way) 1e-2.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, generator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.loss.loss_utils import ForCausalLMLoss

from s1fast.kernels import force_backend, fused_linear_cross_entropy, fused_linear_cross_entropy_reference, interpreting
from s1fast.model.shapes import QWEN25_SHAPES

flce_module = importlib.import_module("s1fast.kernels.fused_linear_cross_entropy")
ce_module = importlib.import_module("s1fast.kernels.cross_entropy")
BACKENDS = ["triton", "torch"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_case(shape, H, V, dtype, bias=True, ignore="some", seed=None):
    g = generator(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    if ignore == "some":
        flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 3]] = -100
    elif ignore == "all":
        flat[:] = -100
    return hidden, weight, b, labels


def grads_of(fn, tensors, grad_output=None):
    """Loss and gradients of every tensor in ``tensors`` (None entries skipped) through ``fn(*leaves)``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    loss = fn(*leaves)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    wanted = [t for t in leaves if t is not None]
    return loss, torch.autograd.grad(loss, wanted, go)


def run(backend, hidden, weight, bias, labels, grad_output=None, **kw):
    with force_backend(backend):
        return grads_of(lambda h, w, b: fused_linear_cross_entropy(h, w, labels, b, **kw), (hidden, weight, bias),
                        grad_output)


def reference64(hidden, weight, bias, labels, grad_output=None, **kw):
    """float64 full logits, F.cross_entropy (+ z-loss), through autograd."""
    def loss_fn(h, w, b):
        x = F.linear(h, w, b).flatten(0, -2)
        y = labels.reshape(-1)
        valid = y != kw.get("ignore_index", -100)
        rows = F.cross_entropy(x, y, ignore_index=kw.get("ignore_index", -100), reduction="none",
                               label_smoothing=kw.get("label_smoothing", 0.0))
        rows = rows + kw.get("z_loss", 0.0) * torch.logsumexp(x, 1).pow(2) * valid
        reduction = kw.get("reduction", "mean")
        if kw.get("num_items_in_batch") is not None:
            return rows.sum() / kw["num_items_in_batch"]
        if reduction == "none":
            return rows.reshape(labels.shape)
        return rows.sum() / valid.sum().clamp(min=1) if reduction == "mean" else rows.sum()

    return grads_of(loss_fn, tuple(t.double() if t is not None else None for t in (hidden, weight, bias)), grad_output)


def check(got, want, dtype):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, 1e-5 if dtype == torch.float32 else 1e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunked", [False, True])
def test_matches_float64_reference(backend, dtype, reduction, chunked):
    hidden, weight, bias, labels = make_case((2, 5), 48, 1000, dtype)
    go = torch.rand(2, 5) + 0.5 if reduction == "none" else None  # non-uniform per-row grad_output
    budget = 3 * 1000 * 12 if chunked else None  # 3 rows per chunk (4 chunks, last one partial) or one chunk
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    got = run(backend, hidden, weight, bias, labels, go, chunk_budget_bytes=budget, **opts)
    check(got, reference64(hidden, weight, bias, labels, go, **opts), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_equal_one_chunk(backend, reduction):
    hidden, weight, bias, labels = make_case((13,), 32, 4099, torch.float32)
    go = torch.rand(13) + 0.5 if reduction == "none" else None
    one = run(backend, hidden, weight, bias, labels, go, reduction=reduction)
    many = run(backend, hidden, weight, bias, labels, go, reduction=reduction, chunk_budget_bytes=1)  # 1 row/chunk
    # fp32 GEMMs of different shapes sum in different orders: agreement at fp32 rounding, not bitwise
    assert_close(many[0], one[0], 1e-5)
    for a, b in zip(many[1], one[1]):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_matches_transformers_causal_lm_loss(backend, dtype, num_items):
    """transformers' ForCausalLMLoss on full logits (it shifts labels itself) vs ours on shifted labels."""
    B, T, H, V = 2, 6, 32, 1000
    hidden, weight, _, labels = make_case((B, T), H, V, dtype, bias=False)
    n_items = torch.tensor(11) if num_items == "tensor" else num_items
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    got = run(backend, hidden, weight, None, shift_labels, num_items_in_batch=n_items)
    want = grads_of(lambda h, w: ForCausalLMLoss(F.linear(h, w), labels, V, num_items_in_batch=n_items),
                    (hidden, weight))
    assert_close(got[0], want[0], 1e-5 if dtype == torch.float32 else 1e-2)
    for g, r in zip(got[1], want[1]):
        assert_close(g, r, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab(backend):
    hidden, weight, bias, labels = make_case((3,), 16, 151936, torch.float32, ignore="none")
    labels[1] = 151935
    (loss, grads) = run(backend, hidden, weight, bias, labels, label_smoothing=0.05, z_loss=1e-4)
    ref_loss, ref_grads = reference64(hidden, weight, bias, labels, label_smoothing=0.05, z_loss=1e-4)
    assert_close(loss, ref_loss, 1e-5)
    # grad_hidden = g W sums 151,936 fp32 products with cancellation: rounding ~ sqrt(V) * 6e-8 ~ 2e-5 of the
    # largest term (seen up to 2.3e-5 with random seeds), hence 1e-4 here and 1e-5 for the short sums elsewhere
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient_accumulates(backend):
    """The LM head reuses the embedding matrix: its gradient is the sum of both uses."""
    V, H = 1000, 32
    _, weight, _, labels = make_case((2, 5), H, V, torch.float32, bias=False)
    ids = torch.randint(0, V, (2, 5))

    def model(loss_fn, w):
        hidden = torch.tanh(F.embedding(ids, w) * 3)
        return loss_fn(hidden, w)

    w = weight.clone().requires_grad_()
    with force_backend(backend):
        model(lambda h, w_: fused_linear_cross_entropy(h, w_, labels, chunk_budget_bytes=4 * V * 12), w).backward()
    w64 = weight.double().requires_grad_()
    model(lambda h, w_: fused_linear_cross_entropy_reference(h, w_, labels), w64).backward()
    assert_close(w.grad, w64.grad, 1e-5)
    # both uses contribute: the embedding rows of ``ids`` get gradient beyond the head's share
    head_only = torch.autograd.grad(fused_linear_cross_entropy_reference(torch.tanh(F.embedding(ids, w64) * 3).detach(),
                                                                         w64, labels), w64)[0]
    assert (w64.grad - head_only)[ids.view(-1)].abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(backend, reduction):
    hidden, weight, bias, labels = make_case((4,), 16, 1000, torch.float32, ignore="all")
    loss, grads = run(backend, hidden, weight, bias, labels, reduction=reduction, chunk_budget_bytes=1)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_required(backend):
    hidden, weight, bias, labels = make_case((5,), 16, 1000, torch.float32)
    (_, ref_grads) = reference64(hidden, weight, bias, labels)
    h = hidden.clone().requires_grad_()
    with force_backend(backend):
        (gh,) = torch.autograd.grad(fused_linear_cross_entropy(h, weight, labels, bias), h)
        w = weight.clone().requires_grad_()
        (gw,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, w, labels, bias), w)
    assert_close(gh, ref_grads[0], 1e-5)
    assert_close(gw, ref_grads[1], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_under_no_grad(backend, monkeypatch):
    def fail(*args):
        raise AssertionError("gradient buffers allocated under torch.no_grad()")

    monkeypatch.setattr(flce_module, "_new_grads", fail)
    hidden, weight, bias, labels = make_case((5,), 16, 1000, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with force_backend(backend), torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, labels, bias)
    assert_close(loss, reference64(hidden, weight, bias, labels)[0], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_hidden_fully_written(backend, reduction, monkeypatch):
    """NaN-poison the gradient buffers (allocated without a memset): every chunk (the partial last one too) must
    overwrite the hidden gradient, and the first chunk must write the accumulators without reading them."""
    original = flce_module._new_grads

    def poisoned(*args):  # the weight and bias accumulators too: the first chunk's GEMM / sum runs with beta = 0
        return tuple(g.fill_(float("nan")) for g in original(*args))

    monkeypatch.setattr(flce_module, "_new_grads", poisoned)
    hidden, weight, bias, labels = make_case((10,), 16, 1000, torch.float32)
    go = torch.rand(10) + 0.5 if reduction == "none" else None
    got = run(backend, hidden, weight, bias, labels, go, reduction=reduction, chunk_budget_bytes=3 * 1000 * 12)
    check(got, reference64(hidden, weight, bias, labels, go, reduction=reduction), torch.float32)


class LargestTensor(TorchDispatchMode):
    """Records the largest storage produced by any aten op (forward and backward) inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_largest_allocation_far_below_full_logits():
    """PyTorch path (the chunk loop is shared with the Triton path, whose kernel allocates nothing)."""
    N, H, V = 1024, 16, 4096
    hidden, weight, bias, labels = make_case((N,), H, V, torch.float32)
    full_logits = N * V * 4  # 16 MiB
    budget = full_logits // 16  # 21 rows per chunk on the PyTorch path (logits + two fp32 temporaries)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with LargestTensor() as eager:
        fused_linear_cross_entropy_reference(h, w, labels).backward()
    assert eager.largest >= full_logits  # the tracker sees the unfused logits, so it can catch ours
    with force_backend("torch"), LargestTensor() as fused:
        fused_linear_cross_entropy(h, w, labels, chunk_budget_bytes=budget).backward()
    # the largest tensor is a chunk of logits (or its fp32 temporaries), within the budget
    assert fused.largest <= budget


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_runs_gemms_in_autocast_dtype(backend, reduction):
    """fp32 weights under bf16 autocast (transformers' Trainer with bf16=True on an fp32 model): the loss is
    the reference's under the same autocast (bf16 logits from bf16-cast inputs, fp32 cross-entropy) and fp32
    gradients reach the fp32 leaves. 2e-2: bf16 logits and gradients, as the module docstring explains."""
    hidden, weight, bias, labels = make_case((3, 5), 32, 300, torch.float32)
    go = torch.rand(3, 5) + 0.5 if reduction == "none" else None

    def under_autocast(fn):
        def call(h, w, b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w, labels, b, reduction=reduction)
        return call

    with force_backend(backend):
        loss, grads = grads_of(under_autocast(fused_linear_cross_entropy), (hidden, weight, bias), go)
    ref_loss, ref_grads = grads_of(under_autocast(fused_linear_cross_entropy_reference), (hidden, weight, bias), go)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_close(loss, ref_loss, 2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_raises_on_cpu(backend):
    hidden, weight, bias, labels = make_case((2, 3), 16, 1000, torch.float32, ignore="none")
    labels[1, 0] = 1000
    with force_backend(backend), pytest.raises(ValueError, match=r"labels\[3\] = 1000 is outside \[0, 1000\)"):
        fused_linear_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h[:, :8], w, y),
            ValueError,
            r"hidden width 8 does not match weight",
        ),
        (lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, b[:10]), ValueError, r"bias must have shape \(100,\)"),
        (lambda h, w, y, b: fused_linear_cross_entropy(h, w, y[:2]), ValueError, r"labels must have shape \(4,\)"),
        (lambda h, w, y, b: fused_linear_cross_entropy(h, w, y.float()), TypeError, r"labels must have dtype in"),
        (lambda h, w, y, b: fused_linear_cross_entropy(h[0], w, y), ValueError, r"hidden must have 2 or 3 dims"),
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h, w.double(), y),
            TypeError,
            r"weight dtype torch.float64 must match",
        ),
        (lambda h, w, y, b: fused_linear_cross_entropy(h.int(), w, y), TypeError, r"hidden must have dtype in"),
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, reduction="avg"),
            ValueError,
            r"reduction must be one of",
        ),
        (lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, label_smoothing=-0.1), ValueError, r"label_smoothing"),
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, reduction="none", num_items_in_batch=3),
            ValueError,
            r"num_items_in_batch .* reduction='none'",
        ),
        (lambda h, w, y, b: fused_linear_cross_entropy(h, w.to("meta"), y), ValueError, r"one device.*weight on meta"),
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, chunk_budget_bytes=0),
            ValueError,
            r"chunk_budget_bytes",
        ),
        (
            lambda h, w, y, b: fused_linear_cross_entropy(h, w, y, num_items_in_batch=0),
            ValueError,
            r"num_items_in_batch must be positive",
        ),
    ],
)
def test_bad_inputs(call, error, message):
    hidden, weight, bias, labels = make_case((4,), 16, 100, torch.float32, ignore="none")
    with pytest.raises(error, match=message):
        call(hidden, weight, labels, bias)


def test_kernel_specs_reuse_cross_entropy_kernel_at_chunk_size():
    shape = dict(QWEN25_SHAPES["1.5B"], tokens=32768, dtype=torch.bfloat16)
    spec, inplace, cast = flce_module.kernel_specs(shape)
    ce_spec = ce_module.fused_kernel_spec(shape)
    assert spec.fn is ce_spec.fn and spec.signature == ce_spec.signature and spec.constexprs == ce_spec.constexprs
    assert spec.constexprs["WRITE_GRAD"] and not spec.constexprs["STORE_LSE"]
    # 1 GiB holds 3533 bf16 rows of 151,936 logits: 32,768 tokens need 10 chunks, balanced to 3277 rows
    assert spec.config.endswith("chunk=3277 rows")
    assert inplace.constexprs["IN_PLACE"] and not cast.constexprs["IN_PLACE"] and cast.signature["out_ptr"] == "*bf16"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 7])
def test_grad_output_other_than_one(backend, dtype, num_items):
    """grad_output is folded in by backward's scaling (in place for fp32, into the cast for bf16): a value
    other than 1 must reach every gradient; 1 must leave them as they are."""
    hidden, weight, bias, labels = make_case((9,), 32, 500, dtype)
    for go in (torch.tensor(-0.37), torch.tensor(1.0)):
        got = run(
            backend, hidden, weight, bias, labels, go, chunk_budget_bytes=4 * 500 * 12, num_items_in_batch=num_items
        )
        check(got, reference64(hidden, weight, bias, labels, go, num_items_in_batch=num_items), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_fails_loudly(backend):
    """Backward scales the saved gradients in place (a Triton kernel on that path): autograd must still
    see the modification, so a retained graph's second backward raises instead of scaling twice."""
    hidden, weight, bias, labels = make_case((6,), 16, 300, torch.float32)
    h = hidden.clone().requires_grad_()
    with force_backend(backend):
        loss = fused_linear_cross_entropy(h, weight, labels)
        loss.backward(torch.tensor(2.0), retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward(torch.tensor(2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero_gradients(backend):
    """No chunk runs, so nothing writes the uninitialised accumulators: they must come back as zeros."""
    hidden, weight, bias, labels = make_case((0,), 16, 300, torch.float32)
    loss, grads = run(backend, hidden, weight, bias, labels, reduction="sum")
    assert float(loss.detach()) == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_matches_float64_reference(dtype, reduction):
    """On a GPU (cuBLAS GEMMs, fp32-output weight-gradient GEMM, compiled kernel), several chunks."""
    hidden, weight, bias, labels = make_case((4, 96), 64, 151936, dtype)
    go = torch.rand(4, 96) + 0.5 if reduction == "none" else None
    cuda = [t.cuda() if t is not None else None for t in (hidden, weight, bias, labels)]
    loss, grads = run("auto", *cuda, go.cuda() if go is not None else None, reduction=reduction,
                      chunk_budget_bytes=100 * 151936 * dtype.itemsize)
    check(
        (loss.cpu(), [g.cpu() for g in grads]),
        reference64(hidden, weight, bias, labels, go, reduction=reduction),
        dtype,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("go", [1.0, -0.37])
def test_cuda_grad_output_scaling(go):
    """On a GPU, bf16: the backward's scaling kernel (in place for the hidden gradient, folded into the fp32 ->
    bf16 cast of the weight gradient; nothing moves in place when grad_output is 1) and the beta = 0 first chunk."""
    hidden, weight, bias, labels = make_case((2, 150), 64, 151936, torch.bfloat16)
    cuda = [t.cuda() for t in (hidden, weight, bias, labels)]
    g = torch.tensor(go)
    loss, grads = run("auto", *cuda, g.cuda(), chunk_budget_bytes=128 * 151936 * 2)
    check((loss.cpu(), [x.cpu() for x in grads]), reference64(hidden, weight, bias, labels, g), torch.bfloat16)


@pytest.mark.gpu
def test_cuda_weight_gradient_gemm_path_is_recorded(monkeypatch):
    """On a GPU, bf16: the weight gradient accumulates through addmm(out_dtype=float32), no [V, H] bf16 temporary,
    and WEIGHT_GRAD_GEMM says so (the benchmarks record it); a torch that refuses that GEMM falls back with the
    reason recorded and warned, and the gradients stay right."""
    hidden, weight, bias, labels = make_case((2, 150), 64, 4096, torch.bfloat16)
    cuda = [t.cuda() for t in (hidden, weight, bias, labels)]
    want = reference64(hidden, weight, bias, labels)
    monkeypatch.setattr(flce_module, "WEIGHT_GRAD_GEMM", {"path": None, "why": None})
    loss, grads = run("auto", *cuda, chunk_budget_bytes=128 * 4096 * 2)
    assert flce_module.WEIGHT_GRAD_GEMM["path"] == "out_dtype", flce_module.WEIGHT_GRAD_GEMM["why"]
    check((loss.cpu(), [x.cpu() for x in grads]), want, torch.bfloat16)

    def refuse(*args):
        raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")

    monkeypatch.setattr(flce_module, "WEIGHT_GRAD_GEMM", {"path": None, "why": None})
    monkeypatch.setattr(flce_module, "_fp32_out_addmm", refuse)
    with pytest.warns(UserWarning, match="falling back"):
        loss, grads = run("auto", *cuda, chunk_budget_bytes=128 * 4096 * 2)
    assert flce_module.WEIGHT_GRAD_GEMM == {"path": "fallback",
                                            "why": "TypeError: addmm() got an unexpected keyword argument 'out_dtype'"}
    check((loss.cpu(), [x.cpu() for x in grads]), want, torch.bfloat16)


@pytest.mark.parametrize("beta", [0, 1])
def test_cuda_fp32_out_gemm_call_is_well_formed_on_meta_tensors(beta):
    """The CUDA-only weight-gradient GEMM (bf16 operands into the fp32 accumulator, beta = 0 for the first chunk)
    cannot run here; on meta tensors PyTorch still checks its arguments, shapes and dtypes. Only a check of this
    torch's meta kernel (torch 2.11's raises TypeError for this call): which GEMM really runs on a GPU is
    test_cuda_weight_gradient_gemm_path_is_recorded's question, and every bench row's (``weight_grad_gemm``)."""
    acc = torch.empty(300, 16, device="meta")
    a, b = (
        torch.empty(300, 7, dtype=torch.bfloat16, device="meta"),
        torch.empty(7, 16, dtype=torch.bfloat16, device="meta"),
    )
    flce_module._fp32_out_addmm(acc, a, b, beta)
    assert acc.shape == (300, 16) and acc.dtype == torch.float32
    with pytest.raises(RuntimeError):  # and it does check: mismatched inner dimensions are refused
        flce_module._fp32_out_addmm(acc, a, b[:5], beta)


# ------------------------------------------------------------------ token accuracy, entropy, z-loss, uniform_grad
def statistics64(hidden, weight, bias, labels, z_loss):
    """float64 per-token entropy, top-1 hit and z-loss term from the full logits (0 on ignored tokens)."""
    x = F.linear(hidden.double(), weight.double(), bias.double() if bias is not None else None)
    valid = labels != -100
    logp = x.log_softmax(-1)
    entropy = torch.where(valid, torch.special.entr(logp.exp()).sum(-1), 0.0)  # 0 log 0 = 0 at -inf logits
    top1 = (valid & (x.argmax(-1) == labels)).double()
    z = torch.where(valid, torch.logsumexp(x, -1).pow(2), 0.0)
    return entropy, top1, z, valid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_statistics_match_float64(backend, dtype, reduction):
    """return_entropy / return_token_accuracy / return_z_loss against float64 full logits, over several chunks with
    ignored tokens and a masked (-inf) vocabulary entry; the loss itself is unchanged by asking for them."""
    hidden, weight, bias, labels = make_case((2, 5), 48, 1000, dtype)
    bias[7] = -torch.inf  # a masked vocabulary entry: exp(-inf) * -inf must not turn the entropy into NaN
    best = F.linear(hidden.double(), weight.double(), bias.double()).argmax(-1)
    labels = torch.where(torch.arange(10).view(2, 5) % 2 == 0, best, labels)  # hits, so accuracy is not just 0
    labels[labels == 7] = 8
    opts = dict(reduction=reduction, z_loss=1e-3, chunk_budget_bytes=3 * 1000 * 12)
    with force_backend(backend):
        out = fused_linear_cross_entropy(hidden, weight, labels, bias, return_z_loss=True,
                                         return_token_accuracy=True, return_entropy=True, **opts)
        plain = fused_linear_cross_entropy(hidden, weight, labels, bias, **opts)
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)
    entropy, top1, z, valid = statistics64(hidden, weight, bias, labels, 1e-3)
    if reduction == "none":
        want = (1e-3 * z, top1, entropy)
    else:
        scale = 1 / valid.sum() if reduction == "mean" else 1.0
        want = (1e-3 * z.sum() * scale, top1.sum() / valid.sum(), entropy.sum() / valid.sum())
    rel = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits GEMM rounds to bf16 (3 significant digits)
    assert_close(out.z_loss, want[0], rel)
    assert_close(out.entropy, want[2], rel)
    if dtype == torch.float32:  # bf16 rounding can tie or swap the two largest logits
        assert_close(out.token_accuracy, want[1], 0.0 if reduction == "none" else 1e-6)  # the mean: fp32 rounding
        assert 0 < top1.sum() < valid.sum()
    assert not any(t.requires_grad for t in out[1:])


def test_token_statistics_collects_every_call():
    """token_statistics(): each call inside the block adds [top-1 hits, entropy sum, tokens] on the device."""
    from s1fast.kernels.fused_linear_cross_entropy import token_statistics

    hidden, weight, bias, labels = make_case((8,), 16, 300, torch.float32)
    labels[:4] = F.linear(hidden, weight, bias)[:4].argmax(-1)
    with token_statistics() as stats:
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias)
        fused_linear_cross_entropy(hidden[:3], weight, labels[:3], bias)
    assert isinstance(loss, torch.Tensor) and len(stats) == 2
    entropy, top1, _, valid = statistics64(hidden, weight, bias, labels, 0.0)
    assert_close(stats[0], torch.stack([top1.sum(), entropy.sum(), valid.sum().double()]), 1e-5)
    assert_close(stats[1][2], valid[:3].sum().double(), 0.0)
    fused_linear_cross_entropy(hidden, weight, labels, bias)
    assert len(stats) == 2  # outside the block: nothing collected


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_only_where_asked(backend):
    hidden, weight, bias, labels = make_case((6,), 16, 300, torch.float32)
    with force_backend(backend):
        out = fused_linear_cross_entropy(hidden, weight, labels, bias, return_token_accuracy=True)
    assert out.z_loss is None and out.entropy is None and out.token_accuracy is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_grad_equals_scaled_sum_and_poisons_weighted_rows(backend, dtype):
    """reduction="none" with uniform_grad: per-token losses as without it; gradients of c * sum as float64 (ignored
    rows' grad_output is free); a grad_output that differs between non-ignored rows gives NaN gradients."""
    hidden, weight, bias, labels = make_case((3, 4), 32, 700, dtype)
    c = torch.rand(()).item() + 0.5
    go = torch.full((3, 4), c)
    go[labels == -100] = 123.0  # ignored rows: any value
    got = run(backend, hidden, weight, bias, labels, go, reduction="none", uniform_grad=True,
              chunk_budget_bytes=5 * 700 * 12)
    want = reference64(hidden, weight, bias, labels, go, reduction="none")
    check(got, want, dtype)
    go[labels != -100] = torch.rand(int((labels != -100).sum())) + 0.5
    _, grads = run(backend, hidden, weight, bias, labels, go, reduction="none", uniform_grad=True)
    assert all(torch.isnan(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_grad_without_host_sync_and_on_an_empty_batch(backend):
    """The shared grad_output is found on the device (no aten._local_scalar_dense: a host sync on a GPU); a batch
    with no rows (TRL's head with every label ignored) gives zero gradients instead of an IndexError."""

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    seen = []
    labels = torch.tensor([-100, 5, 7, -100])
    with Ops():
        value = flce_module._uniform_value(torch.tensor([9.0, 2.0, 2.0, 4.0]), labels, -100)
    assert value.item() == 2.0 and seen and "_local_scalar_dense" not in seen
    hidden, weight, bias, labels = make_case((0,), 16, 50, torch.float32)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    with force_backend(backend):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias, reduction="none", uniform_grad=True)
    loss.sum().backward()
    assert loss.shape == (0,) and hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_uniform_grad_needs_reduction_none():
    hidden, weight, bias, labels = make_case((4,), 16, 50, torch.float32)
    with pytest.raises(ValueError, match="uniform_grad=True applies to reduction='none'"):
        fused_linear_cross_entropy(hidden, weight, labels, uniform_grad=True)


@pytest.mark.skipif(not interpreting(), reason="counting runs under Triton's interpreter (CPU CI)")
def test_statistics_cost_per_row_scalars_only():
    """Bytes counted under the interpreter: entropy, top-1 and lse add three fp32 stores per row to the forward
    kernel, no load (they ride on the first sweep)."""
    from s1fast.bench import perf_model as pm

    hidden, weight, bias, labels = make_case((9,), 16, 5000, torch.float32)
    counts = []
    for stats in (False, True):
        with pm.counting() as launches:
            fused_linear_cross_entropy(hidden, weight, labels, bias, return_entropy=stats, return_z_loss=stats)
        (ce,) = [x for x in launches if x["kernel"] == "_cross_entropy_kernel"]
        counts.append(ce)
    assert counts[1]["load_bytes"] == counts[0]["load_bytes"]
    assert counts[1]["store_bytes"] == counts[0]["store_bytes"] + 3 * 4 * 9
