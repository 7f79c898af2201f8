"""Helpers for the transformer tests: the PyTorch reference model, random weights, inputs, the converter CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# The diffusers config of the `tiny` named config (TransformerConfig.to_diffusers_config of get_config("tiny")).
TINY_DIFFUSERS = dict(
    num_layers=3, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
    joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24, qk_norm="rms_norm",
    sample_size=16, pos_embed_max_size=None,
)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norm scales included) so that no tensor keeps its default init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return module


def torch_reference(seed: int = 0, **config) -> torch.nn.Module:
    """The PyTorch ContentV transformer (torch_npu_backend) with random weights, float32, eval mode."""
    from torch_npu_backend.transformer import SD3Transformer3DModel

    torch.manual_seed(seed)
    return randomize_(SD3Transformer3DModel(**{**TINY_DIFFUSERS, **config}), seed).eval()


def inputs(batch: int, frames: int, height: int, width: int, channels: int, text_len: int, context_dim: int,
           pooled_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random channels-last latents, sigma*1000 timesteps, context and pooled text (float32 numpy)."""
    rng = np.random.default_rng(seed)
    return dict(
        latents=rng.standard_normal((batch, frames, height, width, channels), dtype=np.float32),
        timestep=(rng.uniform(0.05, 1.0, batch) * 1000).astype(np.float32),
        context=rng.standard_normal((batch, text_len, context_dim), dtype=np.float32),
        pooled=rng.standard_normal((batch, pooled_dim), dtype=np.float32),
    )


def torch_velocity(model: torch.nn.Module, x: dict[str, np.ndarray]) -> np.ndarray:
    """Run the torch reference on channels-last numpy inputs; returns channels-last float32 velocity."""
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x["latents"]).permute(0, 4, 1, 2, 3),
            encoder_hidden_states=torch.from_numpy(x["context"]),
            pooled_projections=torch.from_numpy(x["pooled"]),
            timestep=torch.from_numpy(x["timestep"]),
        ).sample
    return out.permute(0, 2, 3, 4, 1).float().numpy()


def run_cli(direction: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m converters.<direction> ARGS`` in a subprocess from the checkout root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", f"converters.{direction}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))
