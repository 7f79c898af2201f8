"""MPS reward against a PyTorch MPS written here from the published architecture (github Kwai-Kolors/MPS,
``trainer/models/cross_modeling.py`` and ``clip_model.py``) on a tiny random ``transformers.CLIPModel``,
saved as a PyTorch state dict and loaded through ``load_reward`` (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.reward_fixtures import TEXT_LEN, jitted, random_ids, tiny_hf_clip, tiny_tokenizer, torch_preprocess

DIM, HEADS, DIM_HEAD, FF_MULT, LAYERS = 24, 2, 8, 2, 2


class TLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class TSwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class TResidual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *a):
        return self.fn(x, *a) + x


class TRotary(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n):
        f = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        return torch.cat([f, f], dim=-1)


def t_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class TParallelBlock(nn.Module):
    """Pre-LN; one fused projection into multi-head q, single-head k and v, and a SwiGLU input; rotary q/k."""

    def __init__(self):
        super().__init__()
        self.norm = TLayerNorm(DIM)
        self.sizes = (HEADS * DIM_HEAD, DIM_HEAD, DIM_HEAD, 2 * FF_MULT * DIM)
        self.rotary_emb = TRotary(DIM_HEAD)
        self.fused_attn_ff_proj = nn.Linear(DIM, sum(self.sizes), bias=False)
        self.attn_out = nn.Linear(HEADS * DIM_HEAD, DIM, bias=False)
        self.ff_out = nn.Sequential(TSwiGLU(), nn.Linear(FF_MULT * DIM, DIM, bias=False))

    def forward(self, x):
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.sizes, dim=-1)
        q = q.view(b, n, HEADS, DIM_HEAD).transpose(1, 2)  # b h n d
        pos = self.rotary_emb(n)
        q = q * pos.cos() + t_rotate_half(q) * pos.sin()
        k = k * pos.cos() + t_rotate_half(k) * pos.sin()
        sim = torch.einsum("bhid,bjd->bhij", q * DIM_HEAD ** -0.5, k)
        out = torch.einsum("bhij,bjd->bhid", sim.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


class TCrossAttention(nn.Module):
    """Pre-LN queries, un-normalised context, single-head k/v, additive context mask, parallel SwiGLU FF."""

    def __init__(self):
        super().__init__()
        self.norm = TLayerNorm(DIM)
        self.to_q = nn.Linear(DIM, HEADS * DIM_HEAD, bias=False)
        self.to_kv = nn.Linear(DIM, 2 * DIM_HEAD, bias=False)
        self.to_out = nn.Linear(HEADS * DIM_HEAD, DIM, bias=False)
        self.ff = nn.Sequential(nn.Linear(DIM, 2 * FF_MULT * DIM, bias=False), TSwiGLU(), nn.Linear(FF_MULT * DIM, DIM, bias=False))

    def forward(self, x, context, mask):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, HEADS, DIM_HEAD).transpose(1, 2) * DIM_HEAD ** -0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1)
        out = torch.einsum("bhij,bjd->bhid", sim.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


class TCrossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([TResidual(TCrossAttention()), TResidual(TParallelBlock())]) for _ in range(LAYERS)])

    def forward(self, q, ctx, mask):
        for cross, block in self.layers:
            q = block(cross(q, ctx, mask))
        return q


class TMPS(nn.Module):
    """The MPS forward for one image per prompt; ``batch_max=True`` is the official batch normalisation."""

    def __init__(self, hf):
        super().__init__()
        self.model = hf
        self.cross_model = TCrossModel()

    def forward(self, frames, ids, cond, batch_max=False):
        m = self.model
        t = m.text_model(input_ids=ids)
        text_f, text_eos = m.text_projection(t.last_hidden_state), m.text_projection(t.pooler_output)
        px = torch_preprocess(frames, m.config.vision_config.image_size)
        image_f = m.visual_projection(m.vision_model(pixel_values=px).last_hidden_state)
        cond_f = m.text_projection(m.text_model(input_ids=cond.expand(ids.shape[0], -1)).last_hidden_state)
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True)[0]
        sim = sim / (sim.max() if batch_max else sim.amax(dim=-1, keepdim=True))
        mask = torch.where(sim > 0.01, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
        img = self.cross_model(image_f, text_f, mask)[:, 0]
        img = img / img.norm(dim=-1, keepdim=True)
        txt = text_eos / text_eos.norm(dim=-1, keepdim=True)
        return m.logit_scale.exp() * (img * txt).sum(-1)


@pytest.fixture(scope="module")
def mps(tmp_path_factory):
    from contentv_jax.models.reward import CONDITION_OVERALL, CLIPConfig, MPSConfig
    from contentv_jax.rewards_io import load_reward

    root = tmp_path_factory.mktemp("mps")
    tok = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    ref = TMPS(tiny_hf_clip(seed=5)).eval()
    torch.save(ref.state_dict(), root / "mps.pth")
    cond = tok([CONDITION_OVERALL], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt").input_ids

    cfg = MPSConfig(clip=CLIPConfig.from_dict(ref.model.config.to_dict()), layer_num=LAYERS, heads=HEADS, dim_head=DIM_HEAD,
                    ff_mult=FF_MULT)
    reward = load_reward("mps", root / "mps.pth", config=cfg, tokenizer=root / "tok")
    return ref, reward, cond, root


def test_mps_matches_torch(mps):
    ref, reward, cond, _ = mps
    assert reward.model.condition_ids == tuple(int(i) for i in cond[0])
    rng = np.random.default_rng(0)
    frames = rng.random((3, 34, 44, 3), dtype=np.float32)
    ids = random_ids(rng, 3, eos=92, vocab=92)
    frames_t = torch.tensor(frames, requires_grad=True)
    out_ref = ref(frames_t, torch.tensor(ids), cond)
    out_ref.sum().backward()
    g_ref = frames_t.grad.numpy()
    score_fn, grad_fn = jitted(reward.model)
    out = np.asarray(score_fn(jnp.asarray(frames), jnp.asarray(ids)))
    grad = np.asarray(grad_fn(jnp.asarray(frames), jnp.asarray(ids)))
    assert out.shape == (3,) and out.dtype == np.float32
    np.testing.assert_allclose(out, out_ref.detach().numpy(), atol=1e-5, rtol=0)
    assert np.abs(g_ref).max() > 1e-3
    np.testing.assert_allclose(grad, g_ref, atol=1e-4 * max(1.0, np.abs(g_ref).max()), rtol=0)
    print(f"MPS: max |score - ref| {np.abs(out - out_ref.detach().numpy()).max():.2e}, max |grad - ref| "
          f"{np.abs(grad - g_ref).max():.2e} (max |grad| {np.abs(g_ref).max():.2e})")
    # a batch of one prompt: the official batch-max normalisation is the per-sample one
    with torch.no_grad():
        one = ref(frames_t[:1], torch.tensor(ids[:1]), cond, batch_max=True)
    np.testing.assert_allclose(out[:1], one.numpy(), atol=1e-5, rtol=0)


def test_mps_mask_is_per_sample(mps):
    """Each sample's score is independent of the rest of the batch (the official batch max couples them)."""
    _, reward, _, _ = mps
    rng = np.random.default_rng(1)
    frames = rng.random((2, 30, 30, 3), dtype=np.float32)
    ids = random_ids(rng, 2, eos=92, vocab=92)
    score_fn, _ = jitted(reward.model)
    both = np.asarray(score_fn(jnp.asarray(frames), jnp.asarray(ids)))
    for i in range(2):
        alone = np.asarray(score_fn(jnp.asarray(frames[i:i + 1]), jnp.asarray(ids[i:i + 1])))
        np.testing.assert_allclose(both[i:i + 1], alone, atol=1e-6, rtol=0)


def test_pickled_module_is_refused(mps, tmp_path):
    from converters.common import CheckpointError
    from contentv_jax.rewards_io import load_reward

    ref, reward, _, root = mps
    torch.save(ref, tmp_path / "module.pth")  # what the MPS release ships: a whole pickled module
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_reward("mps", tmp_path / "module.pth", config=reward.model.config)
