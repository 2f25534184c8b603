"""gumbel_argmax: the Triton kernel (through the interpreter on CPU) against its int64 PyTorch reference, and the
reference's draws against the distribution they stand for.

Exactness: kernel and reference compute the same 32-bit words (the hash is integer arithmetic), the same fp32 noise
up to ``log``'s last bit, and pick the first maximum; tokens are compared for equality (a 1-ulp difference could
only flip a draw whose two best values are within ~1e-7 of each other, which random inputs do not produce).

Statistics: tokens are drawn with fixed keys (the test is deterministic) and compared with float64 softmax
probabilities by Pearson's chi-square; bounds sit at p < 1e-6 for the degrees of freedom (chi2.isf(1e-6, dof)):
a correct sampler fails them once in a million input sets, a biased one (a wrong temperature, a skewed or
correlated noise word) by far.
"""

import importlib

import pytest
import torch
from helpers import assert_spec_matches_kernel, generator, nan_empty

from s1fast.kernels import force_backend, gumbel_argmax, gumbel_argmax_reference
from s1fast.model.shapes import QWEN25_SHAPES

gumbel = importlib.import_module("s1fast.kernels.gumbel_argmax")
CHI2_1E6 = {4: 33.4, 24: 72.2, 63: 131.4}  # chi-square quantiles at p = 1e-6 by degrees of freedom


def make_case(rows, V, dtype, seed=None):
    g = generator(seed)
    logits = (torch.randn(rows, V, generator=g) * 3).to(dtype)
    beta = torch.rand(rows, generator=g) * 2 + 0.25
    beta[::3] = 0.0  # greedy rows among sampled ones
    keys = torch.randint(0, 2**62, (rows,), generator=g)
    positions = torch.randint(0, 2**32, (rows,), generator=g)
    return logits, beta, keys, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [7, 1024, 2500])  # one partial tile, one full tile, three tiles (the last partial)
def test_kernel_matches_reference(dtype, V):
    logits, beta, keys, positions = make_case(9, V, dtype)
    with force_backend("triton"):
        got = gumbel_argmax(logits, beta, keys, positions)
    assert got.dtype == torch.int64 and got.shape == (9,)
    assert torch.equal(got, gumbel_argmax_reference(logits, beta, keys, positions))
    greedy = beta == 0
    assert torch.equal(got[greedy], logits[greedy].float().argmax(-1))  # (that the others sample: the tests below)


def test_every_partial_written_and_bytes_at_the_minimum(monkeypatch):
    """With NaN-poisoned partials (torch.argmax would pick a NaN) the tokens still equal the reference, so every
    tile writes its partial; the kernel reads the logits once (the minimum: 2 V bytes per bf16 row), plus 20 bytes
    of settings per row, and writes 16 bytes per tile."""
    from s1fast.bench.perf_model import counting

    rows, V = 5, 2500
    logits, beta, keys, positions = make_case(rows, V, torch.bfloat16)
    with force_backend("triton"), nan_empty(monkeypatch), counting() as launches:
        got = gumbel_argmax(logits, beta, keys, positions)
    assert torch.equal(got, gumbel_argmax_reference(logits, beta, keys, positions))
    (launch,) = launches
    tiles = -(-V // gumbel._BLOCK)
    assert launch["kernel"] == "_gumbel_argmax_kernel" and launch["grid"] == rows * tiles
    assert launch["load_bytes"] == rows * V * 2 + rows * (4 + 8 + 8)
    assert launch["store_bytes"] == rows * tiles * (4 + 8)


def test_every_tile_competes_and_filtered_tokens_never_win():
    """The winner may sit in any tile (the last, partial one included), and -inf logits are never drawn even at
    a high temperature."""
    V = 2500
    logits = torch.full((6, V), -torch.inf)
    for r, col in enumerate((0, 1023, 1024, 2047, 2048, V - 1)):
        logits[r, col] = 0.0
        logits[r, (col + 700) % V] = -1.0
    beta = torch.full((6,), 0.05)
    keys, positions = torch.arange(6) * 977, torch.arange(6)
    with force_backend("triton"):
        got = gumbel_argmax(logits, beta, keys, positions)
    assert torch.equal(got, gumbel_argmax_reference(logits, beta, keys, positions))
    assert all(bool(torch.isfinite(logits[r, got[r]])) for r in range(6))


def test_draws_follow_softmax():
    """40,000 draws over keys, and over positions of one key, at two temperatures: frequencies match
    softmax(beta * x) in float64."""
    x = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 40_000
    for beta in (1.0, 0.5):
        p = torch.softmax(x.double() * beta, -1)
        for keys, positions in ((torch.arange(n) * 7919 + 3, torch.full((n,), 11)),
                                (torch.full((n,), 123456789), torch.arange(n))):
            tokens = gumbel_argmax_reference(x.expand(n, -1), torch.full((n,), beta), keys, positions)
            counts = torch.bincount(tokens, minlength=5).double()
            chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
            assert chi2 < CHI2_1E6[4], (beta, chi2, counts.tolist(), (n * p).tolist())


def test_consecutive_draws_independent():
    """Pairs of tokens at consecutive positions of one request (and of consecutive keys) are independent: their
    joint frequencies over 5 x 5 cells match the product of the marginals."""
    x = torch.tensor([0.3, -0.2, 0.9, 0.0, -1.0])
    n = 40_001
    p = torch.softmax(x.double(), -1)
    expected = torch.outer(p, p) * (n - 1)
    for keys, positions in ((torch.full((n,), 42), torch.arange(n)), (torch.arange(n), torch.full((n,), 5))):
        tokens = gumbel_argmax_reference(x.expand(n, -1), torch.ones(n), keys, positions)
        joint = torch.bincount(tokens[:-1] * 5 + tokens[1:], minlength=25).double().view(5, 5)
        chi2 = float(((joint - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_1E6[24], chi2


def test_noise_uniform():
    """The noise words: 64 equal bins of U over 2 rows x 500,000 tokens, and the ends of (0, 1) never reached."""
    u = gumbel.gumbel_noise_reference(torch.tensor([0, 2**62 - 1]), torch.tensor([0, 2**32 - 1]), 500_000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    for row in u:
        counts = torch.histc(row, bins=64, min=0, max=1).double()
        expected = row.numel() / 64
        assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_1E6[63]


@pytest.mark.gpu
def test_cuda_kernel_matches_the_cpu_reference(device):
    """Compiled, with logits past 2^31 elements (64-bit row offsets): the same tokens as the int64 reference on
    CPU (the noise words are integer arithmetic, the same bits on both)."""
    rows, V = 14_200, 151_936  # 2.16e9 logits in bf16: 4.3 GB
    _, beta, keys, positions = make_case(rows, 1, torch.bfloat16, seed=5)
    logits = (torch.randn(rows, V, device=device) * 3).to(torch.bfloat16)
    got = gumbel_argmax(logits, beta.to(device), keys.to(device), positions.to(device)).cpu()
    for part in (slice(0, 64), slice(rows - 64, rows)):
        ref = gumbel_argmax_reference(logits[part].cpu(), beta[part], keys[part], positions[part])
        assert torch.equal(got[part], ref)


def test_bad_arguments():
    logits, beta, keys, positions = make_case(3, 10, torch.float32, seed=0)
    cases = [
        ((logits[0], beta, keys, positions), ValueError, "logits must have 2 dims"),
        ((logits.long(), beta, keys, positions), TypeError, "logits must have dtype in"),
        ((logits, beta.double(), keys, positions), TypeError, "beta must have dtype in \\(float32\\)"),
        ((logits, beta, keys.int(), positions), TypeError, "keys must have dtype in \\(int64\\)"),
        ((logits, beta, keys, positions[:2]), ValueError, "positions must have one entry per logits row \\(3\\)"),
        ((logits[:, :0], beta, keys, positions), ValueError, "logits must have at least one column"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=f"gumbel_argmax: {match}"):
            gumbel_argmax(*args)


def test_kernel_specs_describe_the_kernel():
    (spec,) = gumbel.kernel_specs(dict(QWEN25_SHAPES["1.5B"], tokens=64, dtype=torch.bfloat16))
    assert spec.fn is gumbel._gumbel_argmax_kernel
    assert spec.signature["logits_ptr"] == "*bf16" and spec.constexprs == {"BLOCK": gumbel._BLOCK}
    assert_spec_matches_kernel(spec)
