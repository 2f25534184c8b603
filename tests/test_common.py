"""kernels/_common: dispatch and the launch-device guard."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from s1fast.kernels import _common, force_backend, rms_norm, rms_norm_reference


def test_force_backend_rejects_unknown_names_and_restores():
    with pytest.raises(ValueError, match="force_backend: name must be one of"):
        with force_backend("cuda"):
            pass
    x = torch.randn(2, 8)
    with force_backend("torch"):
        assert not _common.use_triton(x)
    assert _common.use_triton(x) == _common.interpreting()


def test_on_device_switches_only_to_another_gpu(monkeypatch):
    """Triton launches on the current device: the guard makes the tensor's GPU current when it is not."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    cpu = torch.randn(1)
    gpu0 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    for t in (cpu, gpu0):
        assert isinstance(_common.on_device(t), contextlib.nullcontext)
    with _common.on_device(gpu1):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_on_a_non_current_gpu_matches_reference():
    x = torch.randn(64, 896, device="cuda:1")
    w = torch.randn(896, device="cuda:1")
    torch.cuda.set_device(0)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_reference(x, w))
