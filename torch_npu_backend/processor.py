"""An attention processor for diffusers' SD3 joint attention that runs our kernels.

Installs on diffusers ``Attention`` modules (``diffusers/models/attention_processor.py``) in place of
``JointAttnProcessor2_0``; numerically the same computation, with the QK RMSNorm and the attention
routed through :mod:`torch_npu_backend.kernels` (``npu_rms_norm`` / ``npu_fusion_attention`` in layout
BNSD on an Ascend NPU, as the official ContentV ``SD3AttnProcessorNPU``; plain PyTorch elsewhere).
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm

from torch_npu_backend import kernels


class ContentVJointAttnProcessor:
    """SD3 joint-attention processor on our kernels.

    Args:
      backend: None (``"npu"`` for tensors on an NPU, else ``"torch"``), ``"npu"`` or ``"torch"``.

    Call signature (diffusers ``Attention.forward`` calls it):
      attn: the diffusers ``Attention`` module (``to_q/k/v``, ``add_q/k/v_proj``, ``norm_q/k``,
        ``norm_added_q/k``, ``to_out``, ``to_add_out``, ``heads``, ``context_pre_only``).
      hidden_states: (B, S_img, C) video tokens.
      encoder_hidden_states: (B, S_txt, C_ctx) text tokens, or None (self-attention over the video
        tokens only, as SD3.5's optional second attention).
      attention_mask: must be None (SD3 / ContentV use no mask).
    Returns:
      (video_out (B, S_img, C), text_out (B, S_txt, C)) with text tokens, else video_out alone; text_out
      skips ``to_add_out`` on a ``context_pre_only`` block, as diffusers does.
    Raises:
      ValueError: an attention mask is given.
    """

    def __init__(self, backend: str | None = None):
        if backend is not None and backend not in kernels.BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {kernels.BACKENDS} (or None for automatic)")
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    def _qk_norm(self, norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        if isinstance(norm, RMSNorm):
            return kernels.rms_norm(x, norm.weight, norm.eps, bias=norm.bias, backend=self.backend)
        return norm(x)  # another qk_norm kind (e.g. LayerNorm): the module's own computation

    def _heads(self, x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
        # (B, S, N*D) -> (B, N, S, D): layout BNSD
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} takes no attention_mask (SD3/ContentV joint attention is unmasked); "
                f"got a tensor of shape {tuple(attention_mask.shape)}"
            )
        batch, s_img = hidden_states.shape[0], hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = self._qk_norm(attn.norm_q, self._heads(query, batch, heads, head_dim))
        key = self._qk_norm(attn.norm_k, self._heads(key, batch, heads, head_dim))
        value = self._heads(value, batch, heads, head_dim)

        if encoder_hidden_states is not None:
            q_txt = self._heads(attn.add_q_proj(encoder_hidden_states), batch, heads, head_dim)
            k_txt = self._heads(attn.add_k_proj(encoder_hidden_states), batch, heads, head_dim)
            v_txt = self._heads(attn.add_v_proj(encoder_hidden_states), batch, heads, head_dim)
            q_txt = self._qk_norm(attn.norm_added_q, q_txt)
            k_txt = self._qk_norm(attn.norm_added_k, k_txt)
            query = torch.cat([query, q_txt], dim=2)
            key = torch.cat([key, k_txt], dim=2)
            value = torch.cat([value, v_txt], dim=2)

        out = kernels.dot_product_attention(query, key, value, layout="BNSD", backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)

        video_out = attn.to_out[1](attn.to_out[0](out[:, :s_img]))  # linear, dropout
        if encoder_hidden_states is None:
            return video_out
        text_out = out[:, s_img:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def install_attention_processor(model: torch.nn.Module, backend: str | None = None) -> ContentVJointAttnProcessor:
    """Installs one :class:`ContentVJointAttnProcessor` on every attention layer of ``model``.

    Args:
      model: a diffusers model with ``set_attn_processor`` (``SD3Transformer2DModel`` and the ContentV
        transformer built on it).
      backend: passed to the processor.
    Returns:
      the installed processor.
    Raises:
      TypeError: ``model`` has no ``set_attn_processor``.
    """
    if not hasattr(model, "set_attn_processor"):
        raise TypeError(f"model {type(model).__name__} has no set_attn_processor (expected a diffusers model)")
    processor = ContentVJointAttnProcessor(backend)
    model.set_attn_processor(processor)
    return processor
