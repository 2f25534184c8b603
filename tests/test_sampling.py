"""s1fast.decode.sampling: per-row settings against transformers' own warpers (temperature, then top-k, then
top-p), the modes, and the request keys. The draws themselves are tested in test_gumbel_argmax."""

import pytest
import torch
from helpers import generator
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from s1fast.decode.sampling import FILTERED, GREEDY, TEMPERATURE, Sampling, _top_k_top_p, request_key, sample

SETTINGS = [Sampling(0.7, 5, None), Sampling(1.0, None, 0.9), Sampling(1.3, 40, 0.5), Sampling(0.6, None, 0.95),
            Sampling(2.0, 1, None), Sampling(1.0, 1000, 0.999), Sampling(0.0), Sampling(0.9)]


def transformers_kept(row: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The tokens transformers' warpers leave finite for one row of logits (its sampling path)."""
    scores = row[None].clone()
    if s.temperature == 0:
        return torch.ones_like(row, dtype=torch.bool)
    scores = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k is not None:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p is not None:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    return torch.isfinite(scores[0])


def params(settings):
    return torch.tensor([s.row() for s in settings], dtype=torch.float32)


def test_filters_keep_what_transformers_keeps():
    """Rows of different settings in one batch keep exactly the tokens transformers' warpers keep for each."""
    g = generator()
    logits = torch.randn(len(SETTINGS), 300, generator=g) * 2
    logits[2, :10] = logits[2, 10]  # ties: at the k-th value all are kept, as transformers keeps them
    kept = torch.isfinite(_top_k_top_p(logits, params(SETTINGS)))
    for r, s in enumerate(SETTINGS):
        want = transformers_kept(logits[r], s)
        # Where the top-p cut falls inside a run of equal logits, which of them an (unstable) sort puts first is
        # arbitrary, in transformers as here: the kept tokens must then be the same in number and value, not index.
        assert torch.equal(logits[r][kept[r]].sort().values, logits[r][want].sort().values), (r, s)
    assert kept.sum(1).tolist()[4] == 1 and kept[6].all() and kept[7].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sample_modes(dtype):
    """Greedy rows take the argmax in every mode; sampled tokens stay inside each row's kept set; a mode below a
    row's own would ignore its filter, so the step runs the highest."""
    g = generator()
    n, V = len(SETTINGS), 300
    logits = (torch.randn(n, V, generator=g) * 2).to(dtype)
    p = params(SETTINGS)
    keys = torch.tensor([request_key(9, i) for i in range(n)])
    kept = torch.isfinite(_top_k_top_p(logits, p))
    for step in range(20):
        positions = torch.full((n,), step)
        tokens = sample(logits, p, keys, positions, FILTERED)
        assert all(bool(kept[r, t]) for r, t in enumerate(tokens.tolist()))
        assert tokens[6] == logits[6].argmax() and tokens[4] == logits[4].argmax()  # greedy; top_k=1
    assert torch.equal(sample(logits, p, keys, positions, GREEDY), logits.argmax(-1))
    plain = [Sampling(0.0), Sampling(0.8), Sampling(1.0)]
    drawn = sample(logits[:3], params(plain), keys[:3], torch.zeros(3, dtype=torch.long), TEMPERATURE)
    assert drawn[0] == logits[0].argmax()
    assert [s.mode for s in SETTINGS] == [FILTERED] * 6 + [GREEDY, TEMPERATURE]


def test_request_keys():
    assert request_key(7, 0) == request_key(7, 0) != request_key(7, 1) != request_key(8, 0)
    assert request_key(7, 1) != request_key(8, 0) and request_key(-3) != request_key(3)
    assert request_key(None) != request_key(None)
    keys = [request_key(s, i) for s in range(50) for i in range(20)] + [request_key(None) for _ in range(50)]
    assert len(set(keys)) == len(keys) and all(0 <= k < 2**62 for k in keys)
