"""fuse_projections: q/k/v and gate/up parameters become views of one buffer per layer with nothing else about the
model changed (names, objects, values, bytes, forward, save_pretrained), on tiny random Qwen2 and Qwen3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, generator
from safetensors.torch import load_file

from s1fast.kernels import add_rms_norm, decode_attention, force_backend, rms_norm, rope_kv_write, swiglu
from s1fast.model.fused_weights import fuse_projections, fused_projections
from s1fast.model.shapes import TINY, random_qwen

ARCHS = ["qwen2", "qwen3"]


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters (a tied lm_head once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_views_change_nothing_but_the_storage(arch):
    model = random_qwen(TINY, arch=arch, random_norms=True, seed=int(generator().initial_seed()))
    ids = torch.randint(0, TINY["vocab"], (2, 5), generator=generator())
    before = {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected, nbytes = logits(model, ids), storage_bytes(model)
    storages = len({p.untyped_storage().data_ptr() for p in model.parameters()})
    assert all(fused_projections(layer) is None for layer in model.model.layers)

    assert fuse_projections(model) is model
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, p in after.items():
        obj, value, requires_grad = before[name]
        assert p is obj and p.requires_grad == requires_grad and torch.equal(p, value), name
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert storage_bytes(model) == nbytes  # no second copy: the buffers replaced the storages they copy
    merged = 2 + 1 + (2 if arch == "qwen2" else 0)  # per layer: q/k/v weights 3 -> 1, gate/up 2 -> 1, biases 3 -> 1
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == storages - merged * TINY["layers"]
    assert torch.equal(logits(model, ids), expected)

    x = torch.randn(3, TINY["hidden"], generator=generator())
    for layer in model.model.layers:
        views = fused_projections(layer)
        att, mlp = layer.self_attn, layer.mlp
        projections = (att.q_proj, att.k_proj, att.v_proj)
        assert views.qkv.data_ptr() == att.q_proj.weight.data_ptr()  # a view, not a copy
        assert views.gate_up.data_ptr() == mlp.gate_proj.weight.data_ptr()
        assert (views.qkv_bias is None) == (arch == "qwen3")
        assert_close(F.linear(x, views.qkv, views.qkv_bias), torch.cat([m(x) for m in projections], -1), 1e-6)
        assert_close(F.linear(x, views.gate_up), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), 1e-6)


def test_save_pretrained_round_trip_and_reloading_into_the_views(tmp_path):
    model = fuse_projections(random_qwen(TINY, random_norms=True))
    ids = torch.randint(0, TINY["vocab"], (2, 5), generator=generator())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # every saved tensor is its own view's values
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))

    # load_state_dict copies into the views: the fusion stays, and the fused views see the new values
    other = random_qwen(TINY, random_norms=True, seed=1)
    model.load_state_dict(other.state_dict())
    layer, source = model.model.layers[1], other.model.layers[1]
    views = fused_projections(layer)
    assert torch.equal(views.qkv[TINY["heads"] * TINY["head_dim"]:][: TINY["kv_heads"] * TINY["head_dim"]],
                       source.self_attn.k_proj.weight)
    assert torch.equal(logits(model, ids), logits(other, ids))


def test_fusion_turns_off_when_parameters_get_their_own_storage_and_refuses_what_it_cannot_fuse():
    model = fuse_projections(random_qwen(TINY))
    pointers = [p.data_ptr() for p in model.parameters()]
    fuse_projections(model)  # already fused: nothing moves
    assert [p.data_ptr() for p in model.parameters()] == pointers
    model.to(torch.float64)  # each parameter gets a new storage of its own
    assert all(fused_projections(layer) is None for layer in model.model.layers)
    fuse_projections(model)
    assert all(fused_projections(layer).qkv.dtype == torch.float64 for layer in model.model.layers)

    model.model.layers[0].self_attn.k_proj.bias = None
    with pytest.raises(ValueError, match=r"fuse_projections: q/k/v must all have biases \(Qwen2\) or none"):
        fuse_projections(model)
    model.model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"fuse_projections: the q/k/v and gate/up projections must be plain "
                                        r"nn.Linear, found \['Identity'\]"):
        fuse_projections(model)
    with pytest.raises(TypeError, match=r"model must be one of"):
        fuse_projections(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_decode_steps_match_transformers(arch):
    """The fused decode step (per layer: q/k/v GEMM, rope_kv_write with Qwen3's q/k norms, split + combine
    decode attention through the page table, o GEMM, add_rms_norm, gate/up GEMM, SwiGLU, down GEMM, add_rms_norm
    into the next layer's input norm or the final norm: 10 launches), token by token for 2 rows through a shuffled
    paged cache, against transformers' forward of the whole sequence (fp32: 1e-4 covers the different summation
    orders of a 2-layer model)."""
    model = fuse_projections(random_qwen(TINY, arch=arch, random_norms=True))
    core, eps, rows, steps, page = model.model, model.config.rms_norm_eps, 2, 5, 4  # crosses a page
    heads, kv_heads, dim, inter = TINY["heads"], TINY["kv_heads"], TINY["head_dim"], TINY["intermediate"]
    ids = torch.randint(0, TINY["vocab"], (rows, steps), generator=generator())
    table = (torch.randperm(rows * 2, generator=generator()) + 1).view(rows, 2).int()
    k_cache, v_cache = (torch.zeros(TINY["layers"], rows * 2 + 1, kv_heads, page, dim) for _ in range(2))
    cos, sin = (t[0] for t in core.rotary_emb(core.embed_tokens.weight, torch.arange(steps)[None]))
    layers = core.layers
    got = []
    with torch.no_grad(), force_backend("triton"):
        for t in range(steps):
            positions = torch.full((rows, 1), t)
            x = F.embedding(ids[:, t : t + 1], core.embed_tokens.weight)
            h = rms_norm(x, layers[0].input_layernorm.weight, eps)
            for i, layer in enumerate(layers):
                att, fused = layer.self_attn, fused_projections(layer)
                norms = (att.q_norm.weight, att.k_norm.weight) if arch == "qwen3" else (None, None)
                q = rope_kv_write(F.linear(h, fused.qkv, fused.qkv_bias), cos, sin, positions, table, k_cache, v_cache,
                                  i, *norms, eps)
                out = decode_attention(q[:, 0], k_cache[i], v_cache[i], positions[:, 0] + 1, page_table=table)
                h, x = add_rms_norm(att.o_proj(out.reshape(rows, 1, heads * dim)), x,
                                    layer.post_attention_layernorm.weight, eps)
                gate_up = F.linear(h, fused.gate_up)
                following = layers[i + 1].input_layernorm if i + 1 < len(layers) else core.norm
                h, x = add_rms_norm(layer.mlp.down_proj(swiglu(gate_up[..., :inter], gate_up[..., inter:])), x,
                                    following.weight, eps)
            got.append(model.lm_head(h))
    assert_close(torch.cat(got, 1), logits(model, ids), 1e-4)
