"""cross_entropy: Triton kernel (through the interpreter on CPU) and PyTorch path against float64 references.

Tolerances, relative to the largest reference magnitude: fp32 1e-5 (the kernel works in fp32: rounding
is ~6e-8 per operation and a 151,936-wide online softmax accumulates a few hundred of them); bf16 1e-2
for gradients (the gradient is stored in bf16: 2^-9 ~ 2e-3 relative per element, plus the backward
scaling rounds once more) while the bf16 loss stays at 1e-5 (it is computed in fp32 from the exact bf16
inputs, which the float64 reference also sees).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_spec_matches_kernel, generator

from s1fast.kernels import cross_entropy, cross_entropy_reference, force_backend
from s1fast.kernels._common import KernelSpec
from s1fast.model.shapes import QWEN25_SHAPES

ce_module = importlib.import_module("s1fast.kernels.cross_entropy")  # the package attribute is the function
BACKENDS = ["triton", "torch"]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """float64 F.cross_entropy + z_loss * logsumexp^2 on non-ignored rows; mean over max(count, 1)."""
    x = logits.double()
    rows = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = labels != ignore_index
    rows = rows + z_loss * torch.logsumexp(x, 1).pow(2) * valid
    if reduction == "none":
        return rows
    return rows.sum() / valid.sum().clamp(min=1) if reduction == "mean" else rows.sum()


def make_case(N, V, dtype, ignore="some", seed=None):
    g = generator(seed)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore == "some":
        labels[torch.randperm(N, generator=g)[: N // 3]] = -100
    elif ignore == "all":
        labels[:] = -100
    return logits, labels


def run(backend, logits, labels, grad_output=None, **kw):
    """Loss and d(loss . grad_output)/dlogits through the public function on the chosen backend."""
    x = logits.clone().requires_grad_()
    with force_backend(backend):
        loss = cross_entropy(x, labels, **kw)
        go = torch.ones_like(loss) if grad_output is None else grad_output
        (grad,) = torch.autograd.grad(loss, x, go)
    return loss, grad


def expected(logits, labels, grad_output=None, **kw):
    x = logits.double().requires_grad_()
    loss = reference(x, labels, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 4099])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_matches_float64_reference(backend, dtype, V, reduction, opts):
    logits, labels = make_case(7, V, dtype)
    # non-uniform grad_output for "none": each row must be scaled by its own entry
    go = torch.rand(7) + 0.5 if reduction == "none" else None
    loss, grad = run(backend, logits, labels, go, reduction=reduction, **opts)
    ref_loss, ref_grad = expected(logits, labels, go, reduction=reduction, **opts)
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, 1e-5)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocab(backend, dtype):
    """V = 151,936 (Qwen2.5): many BLOCK_V iterations, a masked tail block, smoothing and z-loss on."""
    logits, labels = make_case(3, 151936, dtype, ignore="none")
    labels[0] = 151935  # last class: lives in the masked tail block
    opts = dict(label_smoothing=0.05, z_loss=1e-4)
    loss, grad = run(backend, logits, labels, **opts)
    ref_loss, ref_grad = expected(logits, labels, **opts)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grad(backend, reduction):
    logits, labels = make_case(5, 1000, torch.float32, ignore="all")
    loss, grad = run(backend, logits, labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    if reduction == "mean":  # the documented difference: PyTorch's (and transformers') mean is 0 / 0 here
        assert F.cross_entropy(logits, labels, label_smoothing=0.1).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", [{}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}])
def test_masked_vocabulary_entries_match_pytorch(backend, reduction, opts):
    """-inf logits (masked vocabulary entries): scattered ones in every row, and in row 0 the whole first
    8192-wide block the Triton kernel reads (its online softmax then starts from max = -inf). Without
    smoothing PyTorch's loss is finite (s1fast gave NaN from 0 * inf); with smoothing PyTorch's loss is +inf
    (mean_j x_ij = -inf) with a finite gradient. Both must come out as PyTorch's, loss and gradient."""
    V = 8200
    logits, labels = make_case(4, V, torch.float32, ignore="none")
    g = generator()
    masked = torch.rand(4, V, generator=g) < 0.2
    masked[0, :8192] = True
    labels[0] = 8192 + int(torch.randint(0, V - 8192, (1,), generator=g))
    masked[torch.arange(4), labels] = False  # a masked label would give +inf in every variant
    logits[masked] = float("-inf")
    go = torch.rand(4) + 0.5 if reduction == "none" else None
    loss, grad = run(backend, logits, labels, go, reduction=reduction, **opts)
    ref_loss, ref_grad = expected(logits, labels, go, reduction=reduction, **opts)
    assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    assert_close(grad, ref_grad, 1e-5)
    if opts.get("label_smoothing"):
        assert torch.isinf(ref_loss).all() and torch.equal(loss.double(), ref_loss)  # +inf, as PyTorch
    else:
        assert torch.isfinite(loss).all()
        assert_close(loss, ref_loss, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_ignored_rows_and_custom_ignore_index(backend):
    logits, labels = make_case(6, 1000, torch.float32, ignore="none")
    labels[2] = 7  # ignore_index=7: this row is skipped, row with -100 would be out of range
    loss, grad = run(backend, logits, labels, ignore_index=7)
    ref_loss, ref_grad = expected(logits, labels, ignore_index=7)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, 1e-5)
    assert torch.equal(grad[2], torch.zeros(1000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_and_int32_labels(backend):
    """Rows with padding (row stride > V) go through the kernel's stride; int32 labels are accepted."""
    logits, labels = make_case(5, 1000, torch.float32)
    padded = torch.randn(5, 1024)
    padded[:, :1000] = logits
    loss, grad = run(backend, padded[:, :1000], labels.int())
    ref_loss, ref_grad = expected(logits, labels)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_rows_write_every_element(backend, dtype, in_place):
    """NaN-poisoned loss and gradient buffers: every element (ignored rows too) must be overwritten."""
    logits, labels = make_case(6, 4099, dtype)
    scale = torch.rand(6) + 0.5  # per-row scale, as the "none" backward of the fused linear loss uses it
    loss = torch.full((6,), float("nan"))
    grad = logits.clone() if in_place else torch.full_like(logits, float("nan"))
    src = grad if in_place else logits
    with force_backend(backend):
        ce_module.cross_entropy_rows(src, labels, loss, grad, scale, -100, 0.1, 1e-3)
    ref_loss, ref_grad = expected(logits, labels, scale, reduction="none", label_smoothing=0.1, z_loss=1e-3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_in_kernel_gives_nan_row(backend):
    """The no-sync CUDA contract: a bad label poisons only its own row's loss and gradient with NaN."""
    logits, labels = make_case(4, 1000, torch.float32, ignore="none")
    labels[1], labels[3] = 1000, -5
    loss = torch.empty(4)
    grad = torch.empty_like(logits)
    with force_backend(backend):
        ce_module.cross_entropy_rows(logits, labels, loss, grad, torch.ones(()), -100, 0.0, 0.0)
    assert loss[[1, 3]].isnan().all() and grad[[1, 3]].isnan().all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_raises_on_cpu(backend):
    logits, labels = make_case(4, 1000, torch.float32, ignore="none")
    labels[2] = 1000
    with force_backend(backend), pytest.raises(ValueError, match=r"labels\[2\] = 1000 is outside \[0, 1000\)"):
        cross_entropy(logits, labels)
    labels[2] = -3
    with force_backend(backend), pytest.raises(ValueError, match=r"labels\[2\] = -3 .*ignore_index \(-100\)"):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_gives_the_same_gradient(backend):
    """Backward recomputes the gradient from the saved logits and lse (nothing is consumed in place): a
    retained graph's second backward adds the same gradient again, with a different grad_output."""
    logits, labels = make_case(3, 1000, torch.float32)
    x = logits.clone().requires_grad_()
    with force_backend(backend):
        loss = cross_entropy(x, labels)
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        loss.backward(torch.tensor(-0.5))
    ref_loss, ref_grad = expected(logits, labels)
    assert_close(first, ref_grad, 1e-5)
    assert_close(x.grad, 0.5 * ref_grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modified_logits_fail_loudly(backend):
    """The backward reads the logits again: changing them in place after the forward must raise."""
    logits, labels = make_case(3, 1000, torch.float32)
    x = logits.clone().requires_grad_()
    with force_backend(backend):
        y = x * 1.0
        loss = cross_entropy(y, labels)
        y.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_float64_runs_in_float64():
    """float64 logits take the PyTorch path in float64: agreement far below fp32 rounding."""
    logits, labels = make_case(4, 37, torch.float64)
    go = torch.rand(4, dtype=torch.float64)
    opts = dict(reduction="none", label_smoothing=0.2, z_loss=0.01)
    loss, grad = run("auto", logits, labels, go, **opts)
    ref_loss, ref_grad = expected(logits, labels, go, **opts)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close(loss, ref_loss, 1e-12)
    assert_close(grad, ref_grad, 1e-12)


def test_reference_function_matches_float64_reference():
    logits, labels = make_case(5, 1000, torch.float32)
    for reduction in ("mean", "sum", "none"):
        got = cross_entropy_reference(logits, labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        assert_close(got, reference(logits, labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-3), 1e-5)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, y: cross_entropy(x[0], y), ValueError, r"logits must have 2 dims, got shape \(100,\)"),
        (
            lambda x, y: cross_entropy(x, y.float()),
            TypeError,
            r"labels must have dtype in \(int64, int32\), got float32",
        ),
        (lambda x, y: cross_entropy(x, y[:3]), ValueError, r"labels must have shape \(4,\) to match logits \(4, 100\)"),
        (lambda x, y: cross_entropy(x.long(), y), TypeError, r"logits must have dtype in .*got int64"),
        (lambda x, y: cross_entropy(x, y, reduction="avg"), ValueError, r"reduction must be one of .*'avg'"),
        (lambda x, y: cross_entropy(x, y, label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (lambda x, y: cross_entropy(x, y, z_loss=-1.0), ValueError, r"z_loss must be >= 0"),
        (lambda x, y: cross_entropy(x, y.to("meta")), ValueError, r"one device, got logits on cpu, labels on meta"),
    ],
)
def test_bad_inputs(call, error, message):
    logits, labels = make_case(4, 100, torch.float32, ignore="none")
    with pytest.raises(error, match=message):
        call(logits, labels)


@pytest.mark.parametrize("model", ["1.5B", "7B"])
def test_kernel_specs_match_kernel_and_launcher(model):
    shape = dict(QWEN25_SHAPES[model], tokens=32768, dtype=torch.bfloat16)
    fwd, bwd = ce_module.kernel_specs(shape)
    fused = ce_module.fused_kernel_spec(shape)
    block, warps = ce_module._config(shape["vocab"])  # the launcher's own config function
    fwd_constexprs = ["BLOCK_V", "PER_ROW_SCALE", "STORE_LSE", "STORE_STATS", "WRITE_GRAD"]
    for spec, expected_constexprs in ((fwd, fwd_constexprs), (bwd, ["BLOCK_V", "PER_ROW_SCALE"]),
                                      (fused, fwd_constexprs)):
        assert isinstance(spec, KernelSpec)
        _, constexprs = assert_spec_matches_kernel(spec)
        assert sorted(constexprs) == expected_constexprs
        assert spec.signature["logits_ptr"] == "*bf16" and spec.signature["grad_ptr"] == "*bf16"
        assert spec.constexprs["BLOCK_V"] == block and spec.num_warps == warps
    assert fwd.constexprs["STORE_LSE"] and not fwd.constexprs["WRITE_GRAD"]
    assert fused.constexprs["WRITE_GRAD"] and not fused.constexprs["STORE_LSE"]
    assert not fwd.constexprs["STORE_STATS"] and not fused.constexprs["STORE_STATS"]  # training: no statistics
    assert 4096 <= block <= 16384


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_and_label_contract(dtype, monkeypatch):
    """On a GPU: compiled kernel vs float64 at the Qwen vocab; a bad label gives NaN without a sync, and
    raises with S1FAST_CHECK_LABELS=1."""
    logits, labels = make_case(64, 151936, dtype)
    go = torch.rand(64) + 0.5
    loss, grad = run(
        "auto", logits.cuda(), labels.cuda(), go.cuda(), reduction="none", label_smoothing=0.1, z_loss=1e-4
    )
    ref_loss, ref_grad = expected(logits, labels, go, reduction="none", label_smoothing=0.1, z_loss=1e-4)
    assert_close(loss.cpu(), ref_loss, 1e-5)
    assert_close(grad.cpu(), ref_grad, GRAD_TOL[dtype])
    labels[5] = 151936
    bad = cross_entropy(logits.cuda(), labels.cuda(), reduction="none")
    assert bad[5].isnan() and torch.isfinite(bad[torch.arange(64) != 5]).all()
    monkeypatch.setenv("S1FAST_CHECK_LABELS", "1")
    with pytest.raises(ValueError, match=r"labels\[5\] = 151936"):
        cross_entropy(logits.cuda(), labels.cuda())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_under_no_grad(backend, monkeypatch):
    """needs_input_grad stays True under torch.no_grad(): the kernel must still skip writing a gradient."""
    calls = []
    original = ce_module.cross_entropy_rows

    def spy(logits, labels, loss, grad, *rest):
        calls.append((grad, rest[-1]))  # the gradient and the lse buffer (only needed for a backward)
        return original(logits, labels, loss, grad, *rest)

    monkeypatch.setattr(ce_module, "cross_entropy_rows", spy)
    logits, labels = make_case(5, 1000, torch.float32)
    x = logits.requires_grad_()
    with force_backend(backend), torch.no_grad():
        loss = cross_entropy(x, labels)
    assert calls == [(None, None)] and not loss.requires_grad
    assert_close(loss, reference(logits, labels), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_grad_output_read_by_the_backward_kernel(reduction):
    """On a GPU: the backward kernel reads grad_output (times 1 / count for "mean") from device memory."""
    logits, labels = make_case(32, 151936, torch.bfloat16)
    go = torch.tensor(-0.37)
    loss, grad = run("auto", logits.cuda(), labels.cuda(), go.cuda(), reduction=reduction, label_smoothing=0.1)
    ref_loss, ref_grad = expected(logits, labels, go, reduction=reduction, label_smoothing=0.1)
    assert_close(loss.cpu(), ref_loss, 1e-5)
    assert_close(grad.cpu(), ref_grad, GRAD_TOL[torch.bfloat16])
