"""ByteDance's ContentV transformer, written for the tests from the official definition.

Source: ``contentv_transformer.py`` of github ``bytedance/ContentV`` (Apache-2.0), which modifies diffusers'
``transformer_sd3.py``: the 2D patch embedding becomes a per-frame ``Conv2d`` between two einops rearranges
(``b c t h w -> (b t) c h w`` and ``(b t) c h w -> b (t h w) c``) plus the fixed
``get_3d_sincos_pos_embed(embed_dim, spatial_size=(w/p, h/p), temporal_size=t, spatial_interpolation_scale=0.5,
temporal_interpolation_scale=1.0)`` table, and the output is unpatchified with
``b (t h w) (p q c) -> b c t (h p) (w q)``.

This module is the independent reference for ``torch_npu_backend.transformer.SD3Transformer3DModel`` and, through
it, for the JAX ``MMDiT``: it shares no code with either (only diffusers and einops). Written from the official
file, not copied. Its one deviation: ``joint_attention_dim`` and ``pooled_projection_dim`` are constructor
arguments (the official class leaves them at diffusers' defaults 4096 / 2048) so that tiny models can be built.
The NPU attention processor of the official file is not part of the reference (SDPA only).
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from einops import rearrange


class OfficialPatchEmbed3D(torch.nn.Module):
    """The official ``SD3PatchEmbed``: (B, C, T, H, W) -> (B, T*H/p*W/p, D) plus the 3D sin-cos table."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = torch.nn.Conv2d(in_channels, embed_dim, kernel_size=(patch_size, patch_size),
                                    stride=(patch_size, patch_size), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = x.shape
        tokens = self.proj(rearrange(x, "b c t h w -> (b t) c h w"))
        tokens = rearrange(tokens, "(b t) c h w -> b (t h w) c", b=batch)
        table = get_3d_sincos_pos_embed(
            embed_dim=self.embed_dim,
            spatial_size=(width // self.patch_size, height // self.patch_size),
            temporal_size=frames,
            spatial_interpolation_scale=0.5,
            temporal_interpolation_scale=1.0,
            output_type="pt",
        )
        return tokens + table.flatten(0, 1).unsqueeze(0).to(device=tokens.device, dtype=tokens.dtype)


class OfficialSD3Transformer3DModel(SD3Transformer2DModel):
    """The official ``SD3Transformer3DModel`` (forward without LoRA scaling; SDPA attention)."""

    def __init__(self, in_channels: int = 16, out_channels: int = 16, patch_size: int = 2, num_layers: int = 38,
                 num_attention_heads: int = 38, attention_head_dim: int = 64, joint_attention_dim: int = 4096,
                 pooled_projection_dim: int = 2048):
        inner = num_attention_heads * attention_head_dim
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, patch_size=patch_size, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
            caption_projection_dim=inner, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        self.pos_embed = OfficialPatchEmbed3D(patch_size, in_channels, inner)

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        p = self.config.patch_size
        return rearrange(x, "b (t h w) (p q c) -> b c t (h p) (w q)", t=frames, h=height // p, w=width // p, p=p, q=p)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        _, _, frames, height, width = hidden_states.shape
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        return self.unpatchify(hidden_states, frames, height, width)
