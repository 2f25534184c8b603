"""swiglu: Triton kernels (through the interpreter on CPU) and the PyTorch path, forward and backward, against a
float64 reference and transformers' own Qwen2MLP.

Tolerances, relative to the largest reference magnitude (and elementwise):
- fp32 1e-5: the kernels compute in fp32 (a few roundings of ~6e-8 each, plus exp's own error).
- bf16 1.6e-2 = 2^-6: bf16 keeps 8 significant bits; the kernels round once on store, up to 2^-8 relative
  on GPU and just under 2^-7 in Triton's interpreter (it truncates fp32->bf16). PyTorch's bf16 path rounds
  twice (silu, then the product; in backward the product, then silu's derivative), so kernel vs transformers
  differ by at most 2^-7 + 2 * 2^-8 < 2^-6.
The PyTorch path runs exactly Qwen2MLP's ``act_fn(gate) * up``, so against transformers it matches bit for bit.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_spec_matches_kernel, generator, nan_empty
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from s1fast.kernels import force_backend, swiglu, swiglu_reference
from s1fast.model.shapes import QWEN25_SHAPES

swiglu_module = importlib.import_module("s1fast.kernels.swiglu")  # the package attribute is the function
BACKENDS = ["triton", "torch"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def make_case(shape, dtype, seed=None):
    """gate spread over silu's curved range (|gate| up to ~8), up and the upstream gradient random."""
    g = generator(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return gate, up, grad


def run(backend, gate, up, grad):
    """Output, dgate and dup through the public function on the chosen backend."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    with force_backend(backend):
        out = swiglu(gate, up)
        dgate, dup = torch.autograd.grad(out, (gate, up), grad)
    return out, dgate, dup


def run_float64(gate, up, grad):
    gate, up = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    out = F.silu(gate) * up
    return (out, *torch.autograd.grad(out, (gate, up), grad.double()))


def run_torch_eager(gate, up, grad):
    """What Qwen2MLP computes between its projections, in the inputs' dtype."""
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = Qwen2MLP(Qwen2Config(hidden_size=8, intermediate_size=8, hidden_act="silu")).act_fn(gate) * up
    return (out, *torch.autograd.grad(out, (gate, up), grad))


CASES = [
    ((3, 100), torch.float32),  # odd width: masked columns, no 128-bit vectors
    ((2, 3, 896), torch.bfloat16),  # several rows per tile
    ((3, 8960), torch.bfloat16),  # Qwen2.5-1.5B intermediate: 9 column blocks, the last partly masked
    ((1, 4864), torch.float32),  # 0.5B intermediate, one row
    ((2, 1, 3584), torch.bfloat16),  # T = 1 (decode)
    ((5, 37, 16), torch.float32),  # narrow rows: 185 rows in one 256-row tile
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_matches_float64_and_torch(backend, shape, dtype):
    gate, up, grad = make_case(shape, dtype)
    results = run(backend, gate, up, grad)
    for actual in results:
        assert actual.shape == gate.shape and actual.dtype == dtype
    for actual, expected in zip(results, run_float64(gate, up, grad)):
        assert_close(actual, expected, TOL[dtype])
    for actual, expected in zip(results, run_torch_eager(gate, up, grad)):
        if backend == "torch":
            assert torch.equal(actual, expected)
        else:
            assert_close(actual, expected, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_in_qwen2mlp(backend, dtype):
    """down_proj(swiglu(gate_proj(x), up_proj(x))) against Qwen2MLP: its internal activation (captured at
    down_proj's input), its output, and the gradients of x and of all three projections."""
    torch.manual_seed(torch.seed() % 2**31)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=64, intermediate_size=200, hidden_act="silu")).to(dtype)
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 3, 64, dtype=dtype)
    params = (x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)

    captured = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    expected_out = mlp(x)
    hook.remove()
    expected_grads = torch.autograd.grad(expected_out, params, grad)

    with force_backend(backend):
        act = swiglu(mlp.gate_proj(x), mlp.up_proj(x))
    out = mlp.down_proj(act)
    grads = torch.autograd.grad(out, params, grad)

    # Both sides run the same projections on the same inputs: only swiglu differs. In bf16 its difference
    # (< 2^-6, see the module docstring) passes through down_proj and the weight-gradient matmuls, whose bf16
    # outputs round once more (2^-7), hence twice the bound there (observed: up to ~1.2e-2).
    rel = 2 * TOL[dtype] if dtype == torch.bfloat16 else TOL[dtype]
    for actual, expected in zip((act, out, *grads), (captured[0], expected_out, *expected_grads)):
        if backend == "torch":
            assert torch.equal(actual, expected)
        else:
            assert_close(actual, expected, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_gradients(backend):
    g = generator()
    # a fused gate_up projection split in two (rows strided by 2 * width: handled by strides, no copy) ...
    gate_up = torch.randn(2, 3, 2 * 896, generator=g) * 3
    chunked = gate_up.chunk(2, dim=-1)
    # ... and transposed views (leading dims not collapsible, made contiguous)
    transposed = tuple(torch.randn(4, 5, 96, generator=g).transpose(0, 1) * scale for scale in (3, 1))
    for gate, up in (chunked, transposed):
        assert not gate.is_contiguous() and not up.is_contiguous()
        grad = torch.randn(gate.shape[::-1], generator=g).permute(*reversed(range(gate.dim())))  # non-contiguous too
        results = run(backend, gate, up, grad)
        for actual, expected in zip(results, run_float64(gate, up, grad)):
            assert_close(actual, expected, TOL[torch.float32])


def test_every_output_element_is_written(monkeypatch):
    """The output and both gradients start as NaN."""
    shapes = [((3, 100), torch.float32), ((3, 8960), torch.bfloat16), ((5, 37, 16), torch.float32)]
    for gate, up, grad in (make_case(*case) for case in shapes):
        with nan_empty(monkeypatch):
            results = run("triton", gate, up, grad)
        for actual, expected in zip(results, run_float64(gate, up, grad)):
            assert torch.isfinite(actual).all()
            assert_close(actual, expected, TOL[gate.dtype])


def test_saves_only_inputs_and_writes_fresh_gradients():
    """Backward recomputes silu from the saved gate and up (no saved activation) and overwrites nothing."""
    gate, up, grad = make_case((4, 896), torch.bfloat16)
    copies = [t.clone() for t in (gate, up, grad)]
    gate.requires_grad_(), up.requires_grad_()
    with force_backend("triton"):
        out = swiglu(gate, up)
    saved = out.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]
    dgate, dup = torch.autograd.grad(out, (gate, up), grad)
    for tensor, copy in zip((gate, up, grad), copies):
        assert torch.equal(tensor, copy)
    pointers = {t.data_ptr() for t in (gate, up, grad, out)}
    assert dgate.data_ptr() not in pointers and dup.data_ptr() not in pointers


def test_dispatch_triton_function_and_float64_reference():
    gate, up, _ = make_case((2, 64), torch.float32)
    with force_backend("triton"):
        assert type(swiglu(gate.requires_grad_(), up).grad_fn).__name__ == "_SwiGLUFunctionBackward"
        out64 = swiglu(gate.double(), up.double())  # float64 always takes the reference
    assert "SwiGLUFunction" not in type(out64.grad_fn).__name__
    assert torch.equal(out64, swiglu_reference(gate.double(), up.double()))


def test_bad_inputs_raise_clear_errors():
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(TypeError, match=r"swiglu: up must be a torch.Tensor, got float"):
        swiglu(gate, 1.0)
    dtypes = r"\(float32, bfloat16, float16, float64\)"
    with pytest.raises(TypeError, match=rf"swiglu: gate must have dtype in {dtypes}, got int64"):
        swiglu(torch.ones(2, 8, dtype=torch.long), up)
    message = r"swiglu: gate and up must have the same shape, got gate \(2, 8\) and up \(2, 7\)"
    with pytest.raises(ValueError, match=message):
        swiglu(gate, up[:, :7])
    with pytest.raises(TypeError, match=r"swiglu: gate and up must have the same dtype, got gate torch.float32 and up"):
        swiglu(gate, up.bfloat16())
    with pytest.raises(ValueError, match=r"swiglu: all tensors must be on one device, got gate on cpu, up on meta"):
        swiglu(gate, up.to("meta"))
    with pytest.raises(ValueError, match=r"swiglu: gate and up must have at least 1 dim"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))


def test_kernel_specs_describe_the_launched_kernels():
    kernels = {swiglu_module._swiglu_fwd_kernel, swiglu_module._swiglu_bwd_kernel}
    for dims in QWEN25_SHAPES.values():
        specs = swiglu_module.kernel_specs(dict(dims, tokens=4096, dtype=torch.bfloat16))
        assert [s.name for s in specs] == ["swiglu_fwd", "swiglu_bwd"]
        for spec in specs:
            assert spec.fn in kernels  # a JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
            assert_spec_matches_kernel(spec)
            assert set(spec.signature.values()) <= {"*bf16", "i32"}
            block, rows, warps = swiglu_module._config(dims["intermediate"])
            assert spec.constexprs == {"BLOCK": block, "ROWS": rows} and spec.num_warps == warps
            assert block & (block - 1) == 0 and rows & (rows - 1) == 0


@pytest.mark.gpu
def test_rows_past_int32_offsets(device):
    """rows x width > 2**31: row offsets must be 64-bit. Checks the last rows against the reference."""
    width = 4096
    rows = 2**31 // width + 8
    gate = torch.randn(rows, width, device=device, dtype=torch.bfloat16).requires_grad_()
    up = torch.randn(rows, width, device=device, dtype=torch.bfloat16).requires_grad_()
    out = swiglu(gate, up)
    grad = torch.randn_like(out)
    dgate, dup = torch.autograd.grad(out, (gate, up), grad)
    tail = slice(rows - 16, rows)
    expected = run_float64(gate[tail].cpu(), up[tail].cpu(), grad[tail].cpu())
    for actual, ref in zip((out, dgate, dup), expected):
        assert_close(actual[tail].cpu(), ref, TOL[torch.bfloat16])
