"""apply_rope: the Triton kernel (through the interpreter on CPU) and the PyTorch path, forward and backward,
against a float64 reference and transformers' apply_rotary_pos_emb with cos/sin from Qwen2RotaryEmbedding.

Tolerances are elementwise error bounds, not blanket atol/rtol. Each output element is a two-term sum
``y = x_a * c + x_b * s`` (forward: ``y1 = c1 x1 - s1 x2``, ``y2 = c2 x2 + s2 x1``; backward the transposed
pair). Let ``mag = |x_a c| + |x_b s|`` and ``u32 = 2^-24``. The kernel computes in fp32 from inputs that
fp32 holds exactly: two products and one sum (or one FMA) give ``|err| <= 2 u32 mag``; casting to the
output dtype adds ``u_out |y|``: 0 for fp32, 2^-8 for bf16 (half an ulp: round-to-nearest, as on GPU and in
torch), 2^-7 for bf16 under Triton's interpreter, whose fp32->bf16 cast truncates. So against float64:
``|y - y64| <= u_out |y64| + 3 u32 mag`` (3 instead of 2 absorbs second-order terms). transformers computes
in the activation dtype (cos/sin are cast to it): each product and the sum are rounded, ``|err| <=
u_act (mag + |y|)``; against it we allow the sum of both bounds, about one bf16 ulp of the terms. A sign or
half swap errs by O(mag) and fails both bounds.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import assert_spec_matches_kernel
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from s1fast.kernels import apply_rope, apply_rope_reference, force_backend, interpreting
from s1fast.kernels import rope as rope_module
from s1fast.model.shapes import QWEN25_SHAPES

BACKENDS = ["triton", "torch"]
U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _u_out(dtype: torch.dtype, backend: str) -> float:
    """Relative error of the final cast to ``dtype`` (module docstring)."""
    if dtype == torch.float32:
        return 0.0
    return 2 * UNIT_ROUNDOFF[dtype] if backend == "triton" and interpreting() else UNIT_ROUNDOFF[dtype]


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    return torch.cat((t[..., h:], t[..., :h]), dim=-1)


def _mag(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """|x_a c| + |x_b s| per output element (module docstring), in float64."""
    x, c, s = x.double().abs(), cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
    return x * c + (_swap(x * s) if backward else _swap(x) * s)


def _qk(B, Hq, Hkv, T, D, dtype, *, transposed=True, seed=0):
    """Fresh random q, k; ``transposed`` gives Qwen's ``view(B, T, H, D).transpose(1, 2)`` layout."""
    g = torch.Generator().manual_seed(seed)

    def make(H):
        if transposed:
            return torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, H, T, D, generator=g).to(dtype)

    return make(Hq), make(Hkv)


def _rotary(D: int, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin from a real Qwen2RotaryEmbedding (theta 1e6, as Qwen2.5), in ``dtype`` as Qwen returns them."""
    config = transformers.Qwen2Config(
        hidden_size=2 * D, num_attention_heads=2, num_key_value_heads=1, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    return Qwen2RotaryEmbedding(config)(torch.zeros(1, dtype=dtype), position_ids)


def _random_positions(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32768, (B, T), generator=torch.Generator().manual_seed(seed))


def _run(fn, q, k, cos, sin, dq_out, dk_out):
    """Forward and backward of ``fn`` with fresh leaves; returns (q_rot, k_rot, dq, dk)."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_rot, k_rot = fn(q, k, cos, sin)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq_out, dk_out))
    return q_rot.detach(), k_rot.detach(), dq, dk


def _grads_like(q, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=g).to(q.dtype), torch.randn(k.shape, generator=g).to(k.dtype)


def _assert_within(actual, expected, bound, what):
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    excess = (actual.double() - expected.double()).abs() - bound
    assert (excess <= 0).all(), f"{what}: max error over bound {excess.max().item():.3e}"


def _check_fp64(q, k, cos, sin, backend):
    """Forward and backward of apply_rope on ``backend`` against float64 within the docstring's bound."""
    dyq, dyk = _grads_like(q, k)
    with force_backend(backend):
        got = _run(apply_rope, q, k, cos, sin, dyq, dyk)
    ref = _run(apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), dyq.double(), dyk.double())
    u_out = _u_out(q.dtype, backend)
    for name, a, r, x, backward in (
        ("q_rot", got[0], ref[0], q, False), ("k_rot", got[1], ref[1], k, False),
        ("dq", got[2], ref[2], dyq, True), ("dk", got[3], ref[3], dyk, True),
    ):
        assert a.dtype == q.dtype, f"{name}: dtype {a.dtype}, expected q's {q.dtype}"
        _assert_within(a, r, u_out * r.abs() + 3 * U32 * _mag(x, cos, sin, backward), f"{backend} {name}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "Hq", "Hkv", "T", "D"), [(2, 14, 2, 3, 64), (1, 12, 2, 4, 128)])
def test_matches_fp64_reference(backend, dtype, B, Hq, Hkv, T, D):
    q, k = _qk(B, Hq, Hkv, T, D, dtype)
    cos, sin = _rotary(D, _random_positions(B, T), dtype)
    _check_fp64(q, k, cos, sin, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_cos_sin(backend):
    """Halves of cos/sin that differ (the general apply_rotary_pos_emb formula) and fp32 cos with bf16 q."""
    q, k = _qk(2, 3, 1, 2, 16, torch.bfloat16, transposed=False)
    g = torch.Generator().manual_seed(3)
    cos, sin = (torch.rand(2, 2, 16, generator=g) * 2 - 1 for _ in range(2))
    _check_fp64(q, k, cos, sin, backend)


def test_reference_is_transformers_in_fp64():
    q, k = _qk(2, 3, 1, 5, 16, torch.float64)
    g = torch.Generator().manual_seed(4)
    cos, sin = (torch.rand(2, 5, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    dyq, dyk = _grads_like(q, k)
    ours = _run(apply_rope_reference, q, k, cos, sin, dyq, dyk)
    theirs = _run(apply_rotary_pos_emb, q, k, cos, sin, dyq, dyk)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)  # same float64 operations


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [True, False])
def test_matches_transformers(backend, dtype, transposed):
    B, Hq, Hkv, T, D = 2, 7, 1, 3, 64
    q, k = _qk(B, Hq, Hkv, T, D, dtype, transposed=transposed)
    cos, sin = _rotary(D, _random_positions(B, T, seed=5), dtype)
    dyq, dyk = _grads_like(q, k)
    with force_backend(backend):
        ours = _run(apply_rope, q, k, cos, sin, dyq, dyk)
    theirs = _run(apply_rotary_pos_emb, q, k, cos, sin, dyq, dyk)
    ref = _run(apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), dyq.double(), dyk.double())
    u = UNIT_ROUNDOFF[dtype]
    for i, (x, backward) in enumerate(((q, False), (k, False), (dyq, True), (dyk, True))):
        mag, y = _mag(x, cos, sin, backward), ref[i].abs()
        bound = u * (mag + y) + _u_out(dtype, backend) * y + 3 * U32 * mag
        _assert_within(ours[i], theirs[i], bound, f"{backend} output {i} vs transformers")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences(backend):
    """Three sequences packed in one row (positions restart at 0) = each sequence rotated on its own."""
    lengths, D = (4, 1, 3), 64
    q, k = _qk(1, 3, 1, sum(lengths), D, torch.float32)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cos, sin = _rotary(D, position_ids, torch.float32)
    dyq, dyk = _grads_like(q, k)
    with force_backend(backend):
        packed = _run(apply_rope, q, k, cos, sin, dyq, dyk)
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        c, s = _rotary(D, torch.arange(n)[None], torch.float32)
        with force_backend(backend):
            alone = _run(apply_rope, q[:, :, seg], k[:, :, seg], c, s, dyq[:, :, seg], dyk[:, :, seg])
        theirs = apply_rotary_pos_emb(q[:, :, seg], k[:, :, seg], c, s)
        for a, b in zip(packed, alone):
            torch.testing.assert_close(a[:, :, seg], b, rtol=0, atol=0)  # identical per-token arithmetic
        for a, b in zip(packed, theirs):
            torch.testing.assert_close(a[:, :, seg], b, rtol=1e-6, atol=1e-6)  # fp32, |x| < 6: a few ulp
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_cos_batch_one_broadcasts(backend):
    q, k = _qk(3, 4, 2, 2, 32, torch.bfloat16)
    cos, sin = _rotary(32, _random_positions(1, 2, seed=6), torch.bfloat16)
    got = _check_fp64(q, k, cos, sin, backend)
    with force_backend(backend):
        expanded = _run(apply_rope, q, k, cos.expand(3, -1, -1).contiguous(), sin.expand(3, -1, -1).contiguous(),
                        *_grads_like(q, k))
    for a, b in zip(got, expanded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("Hq", "Hkv", "D"), [(14, 2, 64), (12, 2, 128), (28, 4, 128), (40, 8, 128)])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_steps_qwen_heads(Hq, Hkv, D, T):
    """Decoding: one new token or a few (multi-token step) at Qwen2.5's head counts, bf16, Triton."""
    q, k = _qk(1, Hq, Hkv, T, D, torch.bfloat16, seed=T)
    cos, sin = _rotary(D, torch.arange(1000, 1000 + T)[None], torch.bfloat16)
    _check_fp64(q, k, cos, sin, "triton")


def test_layout_kept_and_inputs_untouched():
    q, k = _qk(2, 3, 1, 2, 16, torch.float32)
    q0, k0 = q.clone(), k.clone()
    with force_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, *_rotary(16, _random_positions(2, 2), torch.float32))
    assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()  # transposed layout stays transposed
    assert not q.is_contiguous()
    torch.testing.assert_close(q, q0, rtol=0, atol=0)
    torch.testing.assert_close(k, k0, rtol=0, atol=0)


@pytest.mark.parametrize("backward", [False, True])
def test_poisoned_outputs_every_element_written(backward):
    """Outputs are NaN-filled strided views with NaN gaps: every element gets written, no gap is touched."""
    B, Hq, Hkv, T, D = 2, 5, 3, 2, 16
    q, k = _qk(B, Hq, Hkv, T, D, torch.bfloat16)
    cos, sin = _rotary(D, _random_positions(B, T), torch.float32)
    q_buf = torch.full((B, T, Hq + 2, D), float("nan"), dtype=torch.bfloat16)
    k_buf = torch.full((B, Hkv, T + 1, D), float("nan"), dtype=torch.bfloat16)
    q_out, k_out = q_buf[:, :, 1 : Hq + 1].transpose(1, 2), k_buf[:, :, 1:]
    rope_module._launch_rope(q, k, cos, sin, q_out, k_out, backward=backward)
    if backward:  # R^T = the forward with sin -> -sin for Qwen's symmetric cos/sin
        expected = apply_rope_reference(q.double(), k.double(), cos.double(), -sin.double())
    else:
        expected = apply_rope_reference(q.double(), k.double(), cos.double(), sin.double())
    for name, out, ref, x in (("q", q_out, expected[0], q), ("k", k_out, expected[1], k)):
        bound = _u_out(torch.bfloat16, "triton") * ref.abs() + 3 * U32 * _mag(x, cos, sin, backward)
        _assert_within(out, ref, bound, f"poisoned {name}")
    assert q_buf[:, :, 0].isnan().all() and q_buf[:, :, -1].isnan().all()
    assert k_buf[:, :, 0].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_last_dim_and_empty(backend):
    """A last dim with stride 2 is rotated correctly (copied first); zero tokens give empty outputs."""
    B, Hq, Hkv, T, D = 1, 2, 1, 3, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, T, 2 * D, generator=g)[..., ::2]
    k = torch.randn(B, Hkv, T, 2 * D, generator=g)[..., ::2]
    cos, sin = _rotary(D, _random_positions(B, T), torch.float32)
    _check_fp64(q, k, cos, sin, backend)
    with force_backend(backend):
        q_rot, k_rot = apply_rope(q[:, :, :0], k[:, :, :0], cos[:, :0], sin[:, :0])
    assert q_rot.shape == (B, Hq, 0, D) and k_rot.shape == (B, Hkv, 0, D)


def test_broadcast_gradients_fp16():
    """``.sum().backward()`` hands the backward stride-0 (expanded) gradients; fp16 activations."""
    q, k = _qk(1, 3, 1, 2, 16, torch.float16)
    cos, sin = _rotary(16, _random_positions(1, 2), torch.float16)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    with force_backend("triton"):
        q_rot, k_rot = apply_rope(q, k, cos, sin)
    (q_rot.sum() + k_rot.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    sum(t.sum() for t in apply_rope_reference(q64, k64, cos.double(), sin.double())).backward()
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad)):
        bound = _u_out(torch.float16, "triton") * ref.abs() + 3 * U32 * _mag(torch.ones_like(ref), cos, sin, True)
        _assert_within(got, ref, bound, "grad of sum")


def test_float64_runs_reference_path():
    q, k = _qk(1, 2, 1, 2, 8, torch.float64)
    cos, sin = _rotary(8, _random_positions(1, 2), torch.float64)
    with force_backend("triton"):
        got = apply_rope(q, k, cos, sin)
    for a, b in zip(got, apply_rope_reference(q, k, cos, sin)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bad(**changes):
    q, k = _qk(2, 4, 2, 3, 8, torch.float32)
    cos, sin = _rotary(8, _random_positions(2, 3), torch.float32)
    args = dict(q=q, k=k, cos=cos, sin=sin)
    args.update({name: f(args) for name, f in changes.items()})
    return args


BAD_INPUTS = [
    (dict(q=lambda a: a["q"][0]), ValueError, r"q must have 4 dims, got shape \(4, 3, 8\)"),
    (dict(k=lambda a: a["k"][:, :, :, None]), ValueError, r"k must have 4 dims"),
    (dict(cos=lambda a: a["cos"][0]), ValueError, r"cos must have 3 dims"),
    (
        dict(q=lambda a: a["q"].to(torch.int32)),
        TypeError,
        r"q must have dtype in \(float32, bfloat16, float16, float64\), got int32",
    ),
    (dict(k=lambda a: a["k"].to(torch.bfloat16)), TypeError, r"q and k must have one dtype"),
    (dict(sin=lambda a: a["sin"].to(torch.bfloat16)), TypeError, r"cos and sin must have one dtype"),
    (dict(q=lambda a: a["q"][..., :7], k=lambda a: a["k"][..., :7]), ValueError, r"head_dim .* must be even"),
    (dict(k=lambda a: a["k"][..., :6]), ValueError, r"k must be \[B, Hkv, T, D\] = \[2, Hkv, 3, 8\]"),
    (dict(k=lambda a: a["k"][:, :, :2]), ValueError, r"k must be \[B, Hkv, T, D\]"),
    (dict(k=lambda a: a["k"][:1]), ValueError, r"k must be \[B, Hkv, T, D\]"),
    (
        dict(cos=lambda a: a["cos"][..., :6], sin=lambda a: a["sin"][..., :6]),
        ValueError,
        r"cos must be \[B or 1, T, D\] = \[2 or 1, 3, 8\], got \(2, 3, 6\)",
    ),
    (dict(cos=lambda a: a["cos"][:, :2], sin=lambda a: a["sin"][:, :2]), ValueError, r"cos must be \[B or 1, T, D\]"),
    (
        dict(cos=lambda a: a["cos"].repeat(2, 1, 1), sin=lambda a: a["sin"].repeat(2, 1, 1)),
        ValueError,
        r"cos must be \[B or 1, T, D\]",
    ),
    (dict(sin=lambda a: a["sin"][:1]), ValueError, r"sin must have cos's shape \(2, 3, 8\), got \(1, 3, 8\)"),
    (dict(cos=lambda a: a["cos"].to("meta")), ValueError, r"all tensors must be on one device, .*cos on meta"),
    (dict(cos=lambda a: a["cos"].requires_grad_()), ValueError, r"cos and sin must not require grad"),
    (dict(q=lambda a: a["q"].tolist()), TypeError, r"q must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("changes", "error", "message"), BAD_INPUTS)
def test_bad_inputs(backend, changes, error, message):
    args = _bad(**changes)
    with force_backend(backend), pytest.raises(error, match=r"^apply_rope: " + message):
        apply_rope(**args)


@pytest.mark.parametrize("model", sorted(QWEN25_SHAPES))
def test_kernel_specs_match_kernel_signature(model):
    shape = {**QWEN25_SHAPES[model], "tokens": 4096, "dtype": torch.bfloat16}
    specs = rope_module.kernel_specs(shape)
    assert [s.name for s in specs] == ["rope_fwd", "rope_bwd"]
    blocks, num_warps = rope_module._config(shape["heads"] + shape["kv_heads"], shape["head_dim"])
    for spec, backward in zip(specs, (False, True)):
        assert spec.fn is rope_module._rope_kernel  # a JITFunction (InterpretedFunction under the interpreter)
        runtime, _ = assert_spec_matches_kernel(spec)
        assert spec.constexprs == {"HQ": shape["heads"], "HK": shape["kv_heads"], "HALF": shape["head_dim"] // 2,
                                   **blocks, "BACKWARD": backward}
        assert spec.num_warps == num_warps and spec.num_stages == 1
        assert {spec.signature[n] for n in runtime[:6]} == {"*bf16"}
        assert {spec.signature[n] for n in runtime[6:]} == {"i32"}
    # Strides past 2^31 elements are passed as 64-bit integers (the kernel does its offset math in int64).
    big = rope_module.kernel_specs({**shape, "tokens": 2**31 // (shape["heads"] * shape["head_dim"]) + 1})
    assert big[0].signature["s_qb"] == "i64" and big[0].signature["s_qt"] == "i32"


@pytest.mark.gpu
def test_cuda_large_shape_and_64bit_offsets():
    """On a GPU: more than 2^31 elements in q (int64 offsets), Qwen2.5-32B heads, checked on the last tokens."""
    B, Hq, Hkv, T, D = 1, 40, 8, 2**31 // (40 * 128) + 64, 128
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = (t.cuda() for t in _rotary(D, torch.arange(T)[None], torch.bfloat16))
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    tail = slice(T - 64, T)
    ref = apply_rope_reference(
        q[:, :, tail].double(), k[:, :, tail].double(), cos[:, tail].double(), sin[:, tail].double()
    )
    for out, r, x in ((q_rot, ref[0], q), (k_rot, ref[1], k)):
        bound = _u_out(torch.bfloat16, "triton") * r.abs() + 3 * U32 * _mag(
            x[:, :, tail], cos[:, tail], sin[:, tail], False
        )
        _assert_within(out[:, :, tail], r, bound, "cuda tail")
