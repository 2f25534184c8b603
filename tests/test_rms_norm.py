"""rms_norm: Triton kernels (through the interpreter on CPU) and the PyTorch path, forward and backward, against
a float64 reference and transformers' own Qwen2RMSNorm.

Tolerances, relative to the largest reference magnitude (and elementwise):
- fp32 1e-5: the kernels compute in fp32 (~6e-8 rounding per operation; the row statistics sum a few
  thousand squares), far below it.
- bf16 1.6e-2 = 2^-6: bf16 keeps 8 significant bits, so one rounding costs up to 2^-8 relative
  (round-to-nearest, as on GPU and in torch) or just under 2^-7 (Triton's interpreter truncates fp32->bf16).
  The forward rounds twice (the normalised value back to x's dtype, then the output), so two truncations
  stay under 2^-6; the gradients round once. Against Qwen2RMSNorm, which also rounds twice, the same bound
  holds.
The PyTorch path runs exactly Qwen2RMSNorm's operations, so against transformers it must match bit for bit.
"""

import importlib

import pytest
import torch
from helpers import assert_close, assert_spec_matches_kernel, generator, nan_empty
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from s1fast.kernels import (
    RMSNorm,
    add_rms_norm,
    add_rms_norm_reference,
    force_backend,
    interpreting,
    rms_norm,
    rms_norm_reference,
)
from s1fast.model.shapes import QWEN25_SHAPES

rms_module = importlib.import_module("s1fast.kernels.rms_norm")  # the package attribute is the function
BACKENDS = ["triton", "torch"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}  # fp16: 2 roundings of <= 2^-10


def make_case(shape, dtype, weight_dtype=None, seed=None):
    """Random x (offset and scaled, so rows have different norms), weight and upstream gradient."""
    g = generator(seed)
    width = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + torch.randn(shape[:-1] + (1,), generator=g)).to(dtype)
    weight = (torch.randn(width, generator=g) * 0.5 + 1).to(weight_dtype or dtype)
    out_dtype = torch.promote_types(dtype, weight.dtype)
    grad = torch.randn(shape, generator=g).to(out_dtype)
    return x, weight, grad


def run(backend, x, weight, grad, eps=1e-6):
    """Output, dx and dweight through the public function on the chosen backend."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with force_backend(backend):
        out = rms_norm(x, weight, eps)
        dx, dw = torch.autograd.grad(out, (x, weight), grad)
    return out, dx, dw


def run_float64(x, weight, grad, eps=1e-6):
    return run("torch", x.double(), weight.double(), grad.double(), eps)


def run_qwen2(x, weight, grad, eps=1e-6):
    module = Qwen2RMSNorm(x.shape[-1], eps=eps).to(weight.dtype)
    module.weight.data.copy_(weight)
    x = x.detach().requires_grad_()
    out = module(x)
    dx, dw = torch.autograd.grad(out, (x, module.weight), grad)
    return out, dx, dw


CASES = [
    ((3, 5, 100), torch.float32),  # odd width: masked columns, no 128-bit vectors
    ((8, 896), torch.bfloat16),  # Qwen2.5-0.5B hidden
    ((4, 1536), torch.float32),  # 1.5B hidden, several rows per tile
    ((6, 3584), torch.bfloat16),  # 7B hidden: one row per tile, backward programs loop over several tiles
    ((1, 5120), torch.bfloat16),  # 32B hidden, one row
    ((2, 1, 1536), torch.bfloat16),  # T = 1 (decode)
    ((2, 5, 7, 64), torch.bfloat16),  # q/k norm over head_dim 64: 70 rows = three 32-row tiles, the last partly masked
    ((3, 2, 128), torch.float32),  # head_dim 128
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_matches_float64_and_qwen2(backend, shape, dtype):
    x, weight, grad = make_case(shape, dtype)
    out, dx, dw = run(backend, x, weight, grad)
    assert (out.dtype, dx.dtype, dw.dtype) == (dtype, dtype, dtype)
    assert out.shape == dx.shape == x.shape

    for actual, expected in zip((out, dx, dw), run_float64(x, weight, grad)):
        assert_close(actual, expected, TOL[dtype])
    for actual, expected in zip((out, dx, dw), run_qwen2(x, weight, grad)):
        if backend == "torch":
            assert torch.equal(actual, expected)
        else:
            assert_close(actual, expected, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_bf16_input_follows_torch_promotion(backend):
    """transformers keeps norm weights in fp32 under mixed precision: the output is then fp32."""
    x, weight, grad = make_case((4, 3, 896), torch.bfloat16, weight_dtype=torch.float32)
    out, dx, dw = run(backend, x, weight, grad)
    assert (out.dtype, dx.dtype, dw.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    # Qwen2RMSNorm casts the normalised value to bf16 before the fp32 weight multiplies it: out / w must be
    # a bf16 value up to the final fp32 rounding (2^-24), which the tolerances below could not tell apart.
    y = out.double() / weight.double()
    assert_close(y, y.to(torch.bfloat16).double(), 2**-20)
    for actual, expected in zip((out, dx, dw), run_qwen2(x, weight, grad)):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, TOL[torch.bfloat16])
    for actual, expected in zip((out, dx, dw), run_float64(x, weight, grad)):
        assert_close(actual, expected, TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_gradients(backend):
    g = generator()
    # a column slice (rows strided by 2 * width: handled by strides, no copy) ...
    wide = torch.randn(5, 2 * 896, generator=g)
    sliced = wide[:, 896:]
    # ... and Qwen3's q/k norm layout: [B, T, H, D] transposed to [B, H, T, D] (leading dims not collapsible)
    qk = torch.randn(2, 3, 4, 64, generator=g).transpose(1, 2)
    for x in (sliced, qk):
        assert not x.is_contiguous()
        weight = torch.randn(x.shape[-1], generator=g) + 1
        grad = torch.randn(x.shape[::-1], generator=g).permute(*reversed(range(x.dim())))  # non-contiguous too
        out, dx, dw = run(backend, x, weight, grad)
        for actual, expected in zip((out, dx, dw), run_float64(x, weight, grad)):
            assert_close(actual, expected, TOL[torch.float32])


def test_every_output_element_is_written(monkeypatch):
    """Every buffer the launchers allocate (out, rstd, dx, the dweight partials) starts as NaN."""
    shapes = [((3, 5, 100), torch.float32), ((2, 5, 7, 64), torch.bfloat16), ((5, 3584), torch.float32)]
    for x, weight, grad in (make_case(*case) for case in shapes):
        with nan_empty(monkeypatch):
            results = run("triton", x, weight, grad)
        for actual, expected in zip(results, run_float64(x, weight, grad)):
            assert torch.isfinite(actual).all()
            assert_close(actual, expected, TOL[x.dtype])


def test_dispatch_triton_function_and_float64_reference():
    x, weight, grad = make_case((3, 64), torch.float32)
    with force_backend("triton"):
        assert type(rms_norm(x, weight.requires_grad_()).grad_fn).__name__ == "_RMSNormFunctionBackward"
        out64 = rms_norm(x.double(), weight.double())  # float64 always takes the reference
    assert "RMSNormFunction" not in type(out64.grad_fn).__name__
    assert torch.equal(out64, rms_norm_reference(x.double(), weight.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_is_a_drop_in_for_qwen2rmsnorm(backend):
    reference = Qwen2RMSNorm(128, eps=1e-5)
    reference.weight.data.normal_(1.0, 0.3)
    module = RMSNorm(128, eps=1e-5)
    module.load_state_dict(reference.state_dict())
    assert module.variance_epsilon == reference.variance_epsilon == 1e-5
    assert module.extra_repr() == reference.extra_repr()
    x = torch.randn(2, 3, 128)
    with force_backend(backend):
        out = module(x)
    assert_close(out, reference(x), TOL[torch.float32])
    out.backward(torch.ones_like(out))
    assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8)
    w = torch.randn(8)
    with pytest.raises(TypeError, match=r"rms_norm: x must be a torch.Tensor"):
        rms_norm(x.tolist(), w)
    dtypes = r"\(float32, bfloat16, float16, float64\)"
    with pytest.raises(TypeError, match=rf"rms_norm: x must have dtype in {dtypes}, got int64"):
        rms_norm(torch.ones(2, 8, dtype=torch.long), w)
    with pytest.raises(TypeError, match=r"rms_norm: weight must have dtype in .*got int32"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"rms_norm: weight must have 1 dims, got shape \(1, 8\)"):
        rms_norm(x, w[None])
    message = r"rms_norm: weight must have shape \(8,\) to match x's last dim, got weight \(7,\) for x \(2, 8\)"
    with pytest.raises(ValueError, match=message):
        rms_norm(x, w[:7])
    with pytest.raises(ValueError, match=r"rms_norm: x must have at least 1 dim"):
        rms_norm(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"rms_norm: all tensors must be on one device, got x on cpu, weight on meta"):
        rms_norm(x, w.to("meta"))
    wide = rms_module.MAX_WIDTH + 1
    message = rf"rms_norm: the Triton kernel takes a last dim from 1 to {wide - 1}, got {wide}"
    with force_backend("triton"), pytest.raises(ValueError, match=message):
        rms_norm(torch.randn(1, wide), torch.randn(wide))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_validated(backend):
    """A negative eps gave NaN rows (mean(x^2) + eps < 0) and a string passed on the Triton path; 0 and ints are
    fine (eps = 0 matches the float64 reference exactly as any other eps)."""
    x, weight, _ = make_case((3, 16), torch.float32)
    x[0] = 1e-4  # mean(x^2) = 1e-8: eps = -1e-6 would make it negative
    with force_backend(backend):
        for eps in (-1e-6, float("nan"), float("inf"), "1e-6", None, True, torch.tensor(1e-6)):
            with pytest.raises(ValueError, match=r"rms_norm: eps must be a finite number >= 0, got "):
                rms_norm(x, weight, eps)
        for eps in (0.0, 0, 1):
            assert_close(
                rms_norm(x, weight, eps), rms_norm_reference(x.double(), weight.double(), eps), TOL[torch.float32]
            )
    with pytest.raises(ValueError, match=r"RMSNorm: eps must be a finite number >= 0, got -1"):
        RMSNorm(16, eps=-1)


def test_kernel_specs_describe_the_launched_kernels():
    kernels = {rms_module._rms_norm_fwd_kernel, rms_module._rms_norm_bwd_kernel}
    for dims in QWEN25_SHAPES.values():
        specs = rms_module.kernel_specs(dict(dims, tokens=4096, dtype=torch.bfloat16))
        assert [s.name for s in specs] == ["rms_norm_fwd", "rms_norm_add_fwd", "rms_norm_bwd"]
        for spec in specs:
            assert_spec_matches_kernel(spec)
            assert set(spec.signature.values()) <= {"*bf16", "*fp32", "*i32", "i32", "fp32"}
            assert spec.fn in kernels  # a JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
        block, rows, fwd_warps, bwd_warps = rms_module._config(dims["hidden"])
        assert block >= dims["hidden"] and block & (block - 1) == 0
        for spec, residual in zip(specs[:2], (False, True)):
            assert spec.fn is rms_module._rms_norm_fwd_kernel and spec.num_warps == fwd_warps
            assert spec.constexprs == {"BLOCK": block, "ROWS": rows, "RESIDUAL": residual}
        bwd = specs[2]
        assert bwd.num_warps == bwd_warps and bwd.signature["dw_ptr"] == "*bf16" and bwd.signature["sync_ptr"] == "*i32"
        assert bwd.constexprs == {"BLOCK": block, "ROWS": rows, "BLOCK_P": rms_module._REDUCE_PARTIALS,
                                  "BLOCK_C": rms_module._REDUCE_COLS}


@pytest.mark.parametrize("rows, width, programs", [(1, 200, 4), (37, 200, 4), (1100, 200, 128), (9, 3584, 8)])
def test_backward_is_one_launch_for_any_program_count(rows, width, programs, monkeypatch):
    """One backward launch (no reduction kernel, no torch sum/cast): its reducers sum the dw partials of 1 to 69
    row programs (two BLOCK_P tiles at 69, masked tails) with 1 to 34 reducers (some with no columns at width
    200) to the float64 reference; the sync counters are back to zero afterwards, and a second backward gives
    the same dw bit for bit (a fixed summation order)."""
    monkeypatch.setattr(rms_module, "_CPU_BWD_PROGRAMS", programs)
    monkeypatch.setattr(rms_module, "_REDUCE_PARTIALS", 64)  # 69 partials: two tiles of the reduction
    x, weight, grad = make_case((rows, width), torch.bfloat16)
    launched = []
    kernel = rms_module._rms_norm_bwd_kernel
    monkeypatch.setattr(kernel, "run", _recording(kernel.run, kernel, launched), raising=False)
    out, dx, dw = run("triton", x, weight, grad)
    expected = run_float64(x, weight, grad)
    assert_close(dx, expected[1], TOL[torch.bfloat16])
    assert_close(dw, expected[2], TOL[torch.bfloat16])
    assert launched == [kernel]
    assert torch.equal(rms_module._sync_counters(x.device), torch.zeros(2, dtype=torch.int32))
    assert torch.equal(run("triton", x, weight, grad)[2], dw)


def _recording(original, kernel, launched):
    def call(*args, **kwargs):
        launched.append(kernel)
        return original(*args, **kwargs)
    return call


@pytest.mark.gpu
def test_rows_past_int32_offsets(device):
    """rows x width > 2**31: row offsets must be 64-bit. Checks the last rows against the reference."""
    width = 4096
    rows = 2**31 // width + 8
    x = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    weight = torch.randn(width, device=device, dtype=torch.bfloat16).requires_grad_()
    x.requires_grad_()
    out = rms_norm(x, weight)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    tail = slice(rows - 16, rows)
    ref_out, ref_dx, _ = run_float64(x[tail].cpu(), weight.cpu(), grad[tail].cpu())
    assert_close(out[tail].cpu(), ref_out, TOL[torch.bfloat16])
    assert_close(dx[tail].cpu(), ref_dx, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1536, 3584])
def test_cuda_backward_at_model_shapes(width, device):
    """On a GPU at Qwen2.5-1.5B / 7B widths and 4,099 rows: the persistent backward with its prefetched tiles
    (every program runs several, the last partly masked) and the in-launch dW reducers against float64; twice,
    so the second launch relies on the first one's reset of the sync counters."""
    x, weight, grad = make_case((4099, width), torch.bfloat16)
    expected = run_float64(x, weight, grad)
    for _ in range(2):
        results = run("auto", x.to(device), weight.to(device), grad.to(device))
        for actual, reference in zip(results, expected):
            assert_close(actual.cpu(), reference, TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------ add_rms_norm
# The sum x + residual is rounded once to x's dtype: exactly PyTorch's ``residual + x`` (fp32 sum, round to
# nearest) on the GPU and on the PyTorch path; Triton's interpreter truncates that cast, so there it may be one ulp
# off (SUM_ULP). Against float64 the sum is within one rounding; the normalised output rounds twice more (TOL).
SUM_ULP = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
ADD_CASES = [
    ((3, 5, 100), torch.float32),  # odd width: masked columns
    ((2, 1, 896), torch.bfloat16),  # decode: one token per row, Qwen2.5-0.5B hidden
    ((37, 64), torch.float16),  # two 32-row tiles, the second partly masked
]


def add_case(shape, dtype):
    x, weight, _ = make_case(shape, dtype)
    residual = (torch.randn(shape, generator=generator()) * 3).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", ADD_CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in ADD_CASES])
def test_add_rms_norm_matches_float64_and_qwen2(backend, shape, dtype, monkeypatch):
    """Outputs start NaN (every element must be written); against float64 and against a Qwen2 decoder layer's
    ``residual + x`` followed by Qwen2RMSNorm."""
    x, residual, weight = add_case(shape, dtype)
    with torch.no_grad(), force_backend(backend), nan_empty(monkeypatch):
        normed, summed = add_rms_norm(x, residual, weight)
    assert normed.shape == summed.shape == x.shape and normed.dtype == summed.dtype == dtype
    exact_sum = x.double() + residual.double()
    assert_close(summed, exact_sum, SUM_ULP[dtype])
    assert_close(normed, rms_norm_reference(exact_sum, weight.double()), TOL[dtype])
    torch_sum = residual + x
    module = Qwen2RMSNorm(shape[-1]).to(dtype)
    module.weight.data.copy_(weight)
    with torch.no_grad():
        qwen = module(torch_sum)
    if backend == "torch" or not interpreting():
        assert torch.equal(summed, torch_sum)
    else:
        assert_close(summed, torch_sum, SUM_ULP[dtype])
    if backend == "torch":
        assert torch.equal(normed, qwen)
    else:
        assert_close(normed, qwen, TOL[dtype])


def test_add_rms_norm_strided_inputs_and_float64():
    g = generator()
    wide = torch.randn(4, 2 * 128, generator=g)
    x, residual = wide[:, :128], torch.randn(128, 4, generator=g).t()  # row-strided; last dim not unit-stride
    weight = torch.randn(128, generator=g) + 1
    with torch.no_grad(), force_backend("triton"):
        normed, summed = add_rms_norm(x, residual, weight)
        normed64, summed64 = add_rms_norm(x.double(), residual.double(), weight.double())
    reference = add_rms_norm_reference(x.double(), residual.double(), weight.double())  # float64: the reference
    assert torch.equal(normed64, reference[0]) and torch.equal(summed64, reference[1])
    assert torch.equal(summed64, x.double() + residual.double())
    assert_close(summed, summed64, SUM_ULP[torch.float32])
    assert_close(normed, normed64, TOL[torch.float32])


def test_add_rms_norm_refuses_grad_and_bad_inputs():
    x, residual, weight = add_case((2, 8), torch.float32)
    for name in ("x", "residual", "weight"):
        args = {"x": x, "residual": residual, "weight": weight}
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises(ValueError, match=rf"add_rms_norm: inference only \(no backward\), but {name} requires "
                                             r"grad; call it under torch.no_grad\(\)"):
            add_rms_norm(**args)
        with torch.no_grad():
            add_rms_norm(**args)  # fine without grad mode
    with pytest.raises(ValueError, match=r"add_rms_norm: residual must have x's shape \(2, 8\), got \(1, 8\)"):
        add_rms_norm(x, residual[:1], weight)
    with pytest.raises(TypeError, match=r"add_rms_norm: residual must have dtype in \(float32\), got bfloat16"):
        add_rms_norm(x, residual.bfloat16(), weight)
    with pytest.raises(ValueError, match=r"add_rms_norm: weight must have shape \(8,\) to match x's last dim"):
        add_rms_norm(x, residual, weight[:7])
    with pytest.raises(ValueError, match=r"add_rms_norm: eps must be a finite number >= 0, got -1"):
        add_rms_norm(x, residual, weight, -1)


@pytest.mark.gpu
def test_add_rms_norm_rows_past_int32_offsets(device):
    """rows x width > 2**31 elements: the last rows of both outputs against float64."""
    width = 4096
    rows = 2**31 // width + 8
    x = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    residual = torch.randn(rows, width, device=device, dtype=torch.bfloat16)
    weight = torch.randn(width, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        normed, summed = add_rms_norm(x, residual, weight)
    tail = slice(rows - 16, rows)
    exact_sum = x[tail].cpu().double() + residual[tail].cpu().double()
    assert_close(summed[tail].cpu(), exact_sum, SUM_ULP[torch.bfloat16])
    assert_close(normed[tail].cpu(), rms_norm_reference(exact_sum, weight.cpu().double()), TOL[torch.bfloat16])
