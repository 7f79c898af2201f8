"""A tiny random ContentV model directory in the diffusers layout, for the sampling tests and the benchmark.

Random PyTorch models saved with ``save_pretrained``: ContentV's transformer (``torch_npu_backend``),
diffusers' ``AutoencoderKLWan`` and ``FlowMatchEulerDiscreteScheduler``; tiny text encoders when
``contentv_jax.text`` is available.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Text widths of build_tiny_text_encoders(clip_dims=(16, 16), t5_dim=64): context 64, pooled 32.
TINY_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=None, qk_norm="rms_norm",
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_SHIFT = 3.0


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add small noise to every parameter so that zero-initialised layers (AdaLN, outputs) are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def build_tiny_model_dir(dst: Path, *, text_encoders: bool = True, seed: int = 0) -> Path:
    """Write ``dst/{transformer,vae,scheduler}`` (and the text encoders if possible); returns ``dst``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    from torch_npu_backend.transformer import SD3Transformer3DModel

    if text_encoders:  # first: it writes dst as a whole (temporary sibling, then os.replace)
        from contentv_jax.text import build_tiny_text_encoders

        build_tiny_text_encoders(dst, clip_dims=(16, 16), t5_dim=64)
    torch.manual_seed(seed)
    perturb_(SD3Transformer3DModel(**TINY_TRANSFORMER), seed).save_pretrained(dst / "transformer")
    perturb_(AutoencoderKLWan(**TINY_VAE), seed + 1, 0.02).save_pretrained(dst / "vae")
    FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT).save_pretrained(dst / "scheduler")
    return dst


def load_reference(model_dir: Path):
    """(transformer, vae, scheduler) in PyTorch float32 from ``model_dir``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    from torch_npu_backend.transformer import SD3Transformer3DModel

    transformer = SD3Transformer3DModel.from_pretrained(model_dir / "transformer").eval()
    vae = AutoencoderKLWan.from_pretrained(model_dir / "vae").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")
    return transformer, vae, scheduler
