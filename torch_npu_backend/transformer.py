"""The PyTorch ContentV transformer: diffusers' SD3 MM-DiT with a 3D patch embedding.

This is the model of ByteDance's ContentV (``contentv_transformer.py`` of github ``bytedance/ContentV``,
report section 4): diffusers ``SD3Transformer2DModel`` (``diffusers/models/transformers/transformer_sd3.py``)
whose patch embedding runs the 2D ``pos_embed.proj`` convolution on every latent frame and adds a fixed
3D sin-cos table (``diffusers.models.embeddings.get_3d_sincos_pos_embed``), and whose output is
unpatchified back to a video ``(B, C, T, H, W)``.

It is the numerical reference of contentv-jax's ``MMDiT`` and the model the Ascend backend deploys.
Attention runs through diffusers' ``JointAttnProcessor2_0`` (``F.scaled_dot_product_attention``); an
NPU processor can be set with ``set_attn_processor``. torch_npu is never imported here.

Checkpoints: ``save_pretrained`` / ``from_pretrained`` work as for any diffusers ``ModelMixin``; the
tensor names are those of ContentV-8B and SD3.5 Large (without SD3.5's 2D ``pos_embed.pos_embed`` table).
"""

from __future__ import annotations

import einops
import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

__all__ = ["PatchEmbed3D", "SD3Transformer3DModel", "ContentVTransformer3DModel"]


class PatchEmbed3D(nn.Module):
    """Per-frame 2D patch convolution plus the fixed 3D sin-cos position table.

    Input ``(B, C, T, H, W)``; output ``(B, T * H/p * W/p, D)`` with tokens in (t, h, w) order.
    The table is ``get_3d_sincos_pos_embed(D, spatial_size=(W/p, H/p), temporal_size=T,
    spatial_interpolation_scale=0.5, temporal_interpolation_scale=1.0)`` (note diffusers' (width,
    height) order), computed for the input's T, H, W on every call.
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = latents.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent height and width {h}x{w} must be multiples of the patch size {p}")
        x = self.proj(einops.rearrange(latents, "b c t h w -> (b t) c h w"))  # (B*T, D, H/p, W/p)
        x = einops.rearrange(x, "(b t) d h w -> b (t h w) d", b=b)
        pos = get_3d_sincos_pos_embed(
            embed_dim=self.embed_dim,
            spatial_size=(w // p, h // p),
            temporal_size=t,
            spatial_interpolation_scale=0.5,
            temporal_interpolation_scale=1.0,
            output_type="pt",
        )
        return x + pos.flatten(0, 1).unsqueeze(0).to(device=x.device, dtype=x.dtype)


class SD3Transformer3DModel(SD3Transformer2DModel):
    """ContentV's 3D MM-DiT (diffusers SD3 blocks, 3D patch embed and unpatchify).

    The constructor takes diffusers' ``SD3Transformer2DModel`` config; ``sample_size`` and
    ``pos_embed_max_size`` are kept in the config for compatibility but unused (no 2D table).
    ``dual_attention_layers`` must be empty (ContentV and SD3.5 Large have none).

    ``forward(hidden_states (B, C, T, H, W), encoder_hidden_states (B, L, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), timestep (B,) = sigma * 1000)`` returns the
    velocity ``(B, out_channels, T, H, W)`` (in ``Transformer2DModelOutput.sample`` unless
    ``return_dict=False``).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 38,
        attention_head_dim: int = 64,
        num_attention_heads: int = 38,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 2432,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = "rms_norm",
    ):
        if dual_attention_layers:
            raise ValueError(f"dual_attention_layers must be empty for ContentV, got {dual_attention_layers}")
        # The parent builds a 2D PatchEmbed; build the smallest one (no 2D table) and replace it.
        super().__init__(
            sample_size=patch_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=None,
            dual_attention_layers=(),
            qk_norm=qk_norm,
        )
        # The parent's own register_to_config ran last: restore this model's values.
        self.register_to_config(sample_size=sample_size, pos_embed_max_size=pos_embed_max_size)
        self.pos_embed = PatchEmbed3D(patch_size, in_channels, self.inner_dim)

    def unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """``(B, T*h*w, p*p*C)`` -> ``(B, C, T, h*p, w*p)`` (``b (t h w) (p q c) -> b c t (h p) (w q)``)."""
        p = self.config.patch_size
        h, w = height // p, width // p
        return einops.rearrange(x, "b (t h w) (p q c) -> b c t (h p) (w q)", t=frames, h=h, w=w, p=p, q=p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        _, _, frames, height, width = hidden_states.shape
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)
        output = self.unpatchify(hidden_states, frames, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


ContentVTransformer3DModel = SD3Transformer3DModel
