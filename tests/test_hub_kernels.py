"""s1fast.model.hub_kernels: s1fast's layers through transformers' Hub kernels (the kernels package), offline.

Reference: the same model patched with ``patch(model, loss=False)`` (the same forwards: equal bit for bit) and
unpatched (transformers' code: fp32 rounding apart). The kernels run their PyTorch path, as in test_patch.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from tiny_qwen import random_batch, tiny_model

if not hasattr(pytest.importorskip("kernels"), "kernelize"):  # the repository's own kernels/ folder, left empty
    pytest.skip("the kernels package (Hub kernels) is not installed", allow_module_level=True)
hub = pytest.importorskip("s1fast.model.hub_kernels")

from transformers import AutoModelForCausalLM  # noqa: E402

from s1fast.kernels import force_backend  # noqa: E402
from s1fast.model import patch, unpatch  # noqa: E402

patch_module = importlib.import_module("s1fast.model.patch")
FP32_REL = 1e-5  # as tests/test_patch.py: fp32 in another order, a few 1e-6 after two layers forward and backward


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with force_backend("torch"):
        yield


def loss_and_grads(model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def kernel_calls(monkeypatch):
    """Count the calls of s1fast's rms_norm, apply_rope and swiglu made through the patch forwards."""
    calls = {"rms_norm": 0, "apply_rope": 0, "swiglu": 0}
    for name in calls:
        original = getattr(patch_module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(patch_module, name, counted)
    return calls


def expected_calls(model):
    n = model.config.num_hidden_layers
    norms = 2 * n + 1 + (2 * n if model.config.model_type == "qwen3" else 0)  # Qwen3: q/k norms
    return {"rms_norm": norms, "apply_rope": n, "swiglu": n}


def check_parity(model, ref, monkeypatch):
    input_ids, labels = random_batch(2, 10)
    calls = kernel_calls(monkeypatch)
    loss, grads = loss_and_grads(model, input_ids, labels)
    assert calls == expected_calls(model)  # every layer really runs s1fast's kernel
    patched = patch(copy.deepcopy(ref), loss=False)
    want_loss, want_grads = loss_and_grads(patched, input_ids, labels)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    ref_loss, ref_grads = loss_and_grads(unpatch(ref), input_ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=FP32_REL, atol=0)
    for name, grad in ref_grads.items():
        scale = grad.abs().max()
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=FP32_REL * scale, msg=name)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_kernelize_matches_patch(arch, monkeypatch):
    ref = tiny_model(arch)
    model = hub.kernelize(copy.deepcopy(ref))
    check_parity(model, ref, monkeypatch)
    unpatch(model)  # the Hub kernels' forwards are patch()'s: unpatch restores the class forwards
    calls = kernel_calls(monkeypatch)
    model(input_ids=random_batch(1, 6)[0])
    assert calls["rms_norm"] == calls["swiglu"] == 0


def test_patch_after_hub_kernels_replaces_them_and_says_so(monkeypatch):
    """patch() on a kernelized model: the Hub-kernel forwards go (named in a warning), every layer runs patch()'s
    forward, and the model is no longer re-kernelized by train() / eval()."""
    model = hub.kernelize(tiny_model("qwen2"))
    with pytest.warns(UserWarning, match=r"ran Hub kernels for \['Qwen2MLP', 'Qwen2RMSNorm'\]"):
        patch(model)
    assert patch_module.patched(model) == {"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}
    assert not any("_kernel_repo" in vars(m) for m in model.modules()) and not model.use_kernels


def test_kernel_config_resolves_the_local_repository(monkeypatch):
    """kernel_config() passes transformers' checks for a Qwen model and resolves, through the kernels package's
    LocalLayerRepository, to s1fast's layers (transformers' KernelConfig maps GPU device types only: the device is
    taken as CUDA here; the GPU test below loads a model with it)."""
    from kernels import Mode

    kernel_config_module = importlib.import_module("transformers.utils.kernel_config")
    model = tiny_model("qwen3")
    config = hub.kernel_config()
    config.sanitize_kernel_mapping(model)  # every mapped name is a registered layer of this model
    monkeypatch.setattr(kernel_config_module, "infer_device", lambda _: "cuda")
    config.create_compatible_mapping(model)
    for name, layer in hub.MAPPED.items():
        (repo,) = config.kernel_mapping[name]["cuda"].values()
        assert repo.load() is getattr(hub.layers, layer)
    assert list(config.kernel_mapping["RMSNorm"]["cuda"]) == [Mode.TRAINING]  # the model's mode at load time


def test_from_pretrained_then_kernelize(tmp_path, monkeypatch):
    """A checkpoint loaded with from_pretrained and kernelized for training: patch()'s numbers."""
    ref = tiny_model("qwen2")
    ref.save_pretrained(tmp_path)
    model = hub.kernelize(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train())
    check_parity(model, ref, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_cuda_from_pretrained_use_kernels(arch, tmp_path, monkeypatch):
    """On a GPU: from_pretrained(use_kernels=True, kernel_config=kernel_config()) picks the local repository offline;
    inference first, then train() re-kernelizes (kernelize() adds the training mapping)."""
    ref = tiny_model(arch).cuda()
    ref.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=True, kernel_config=hub.kernel_config(),
                                                 dtype=torch.float32, device_map="cuda")
    calls = kernel_calls(monkeypatch)
    input_ids = random_batch(1, 6)[0].cuda()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        want = ref.eval()(input_ids=input_ids).logits
    assert calls == expected_calls(model)
    torch.testing.assert_close(logits, want, rtol=FP32_REL, atol=FP32_REL * want.abs().max())
    hub.kernelize(model.train())
    assert vars(model.model.norm)["forward"].__func__ is hub.RMSNorm.forward
