"""The two kernels the MM-DiT needs, in PyTorch: softmax attention and RMSNorm.

On an Ascend NPU they run through torch_npu's fused operators, as the official ContentV
``SD3AttnProcessorNPU`` (``contentv_transformer.py``) and diffusers' ``RMSNorm``
(``diffusers/models/normalization.py``) do:

* attention: ``torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, ...,
  scale=1/sqrt(head_dim))``, output = element 0 of the returned tuple;
* RMSNorm: ``torch_npu.npu_rms_norm(x, gamma, epsilon=eps)``, output = element 0 of ``(y, rstd)``.

Elsewhere (CPU, CUDA) they run ``torch.nn.functional.scaled_dot_product_attention`` and a plain RMSNorm
with diffusers' numerics. Both mirror contentv-jax's kernels
(``contentv_jax.models.attention.dot_product_attention`` / ``joint_attention``: softmax scale
1/sqrt(head_dim), joint attention over ``[image ; text]`` tokens).

``backend`` arguments: ``None`` picks ``"npu"`` for tensors on an NPU and ``"torch"`` otherwise;
``"npu"`` forces the torch_npu operators (imported lazily through
:func:`torch_npu_backend.device.require_torch_npu`), ``"torch"`` forces plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torch_npu_backend.device import is_npu_tensor, require_torch_npu

BACKENDS = ("npu", "torch")
LAYOUTS = ("BNSD", "BSND")
# npu_fusion_attention's documented defaults for pre_tockens / next_tockens: no band sparsity. (The
# official processor passes 65536, which only matters with an attention mask; ContentV's 720p videos
# reach ~116K tokens, so we keep the no-sparsity defaults.)
NPU_NO_SPARSITY_TOKENS = 2147483647


def resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    """``backend`` itself when given (validated), else ``"npu"`` for an NPU tensor, ``"torch"`` otherwise.

    Raises:
      ValueError: ``backend`` is not None, ``"npu"`` or ``"torch"``.
    """
    if backend is None:
        return "npu" if is_npu_tensor(x) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS} (or None for automatic)")
    return backend


def dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "BNSD",
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention, no mask, no dropout, scale 1/sqrt(head_dim).

    Args:
      q: (B, N, Sq, D) for ``layout="BNSD"`` (torch / npu_fusion_attention convention) or (B, Sq, N, D) for
        ``layout="BSND"`` (contentv-jax convention).
      k, v: (B, N, Sk, D) / (B, Sk, N, D), same dtype and device as q.
      layout: ``"BNSD"`` or ``"BSND"``.
      backend: None (automatic), ``"npu"`` or ``"torch"`` (module docstring).
    Returns:
      attention output in q's layout, shape and dtype.
    Raises:
      ValueError: unknown layout or backend, or mismatched shapes (named in the message).
      torch_npu_backend.device.NPUUnavailableError: the NPU backend without torch_npu / CANN.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D ({layout}); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    head_axis = 1 if layout == "BNSD" else 2
    if q.shape[0] != k.shape[0] or q.shape[head_axis] != k.shape[head_axis] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} ({layout}) must agree in batch, heads and head_dim"
        )
    head_num = q.shape[head_axis]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if resolve_backend(q, backend) == "npu":
        torch_npu = require_torch_npu()
        return torch_npu.npu_fusion_attention(
            q,
            k,
            v,
            head_num,
            layout,
            pse=None,
            atten_mask=None,
            scale=scale,
            keep_prob=1.0,
            pre_tockens=NPU_NO_SPARSITY_TOKENS,
            next_tockens=NPU_NO_SPARSITY_TOKENS,
            inner_precise=0,
        )[0]
    if layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)
    return out.transpose(1, 2) if layout == "BSND" else out


def joint_attention(
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    *,
    layout: str = "BNSD",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention over ``[image ; text]`` tokens (diffusers ``JointAttnProcessor2_0``; contentv-jax
    ``joint_attention``).

    Args:
      q_img, k_img, v_img: video-token projections after QK norm, (B, N, S_img, D) for ``"BNSD"`` or
        (B, S_img, N, D) for ``"BSND"``.
      q_txt, k_txt, v_txt: text-token projections after QK norm, same layout with S_txt tokens.
      layout, backend: as :func:`dot_product_attention`.
    Returns:
      (out_img, out_txt) in the input layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    token_axis = 2 if layout == "BNSD" else 1
    s_img = q_img.shape[token_axis]
    q = torch.cat([q_img, q_txt], dim=token_axis)
    k = torch.cat([k_img, k_txt], dim=token_axis)
    v = torch.cat([v_img, v_txt], dim=token_axis)
    out = dot_product_attention(q, k, v, layout=layout, backend=backend)
    return out.narrow(token_axis, 0, s_img), out.narrow(token_axis, s_img, out.shape[token_axis] - s_img)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight (+ bias)``.

    Numerics of diffusers ``RMSNorm`` (``diffusers/models/normalization.py``): the mean square is taken in
    float32; with a float16/bfloat16 weight the normalised values are cast to the weight's dtype before
    the scale. On the NPU, ``x`` is cast to the weight's dtype (``npu_rms_norm`` wants equal dtypes).

    Args:
      x: (..., D) any float dtype.
      weight: (D,) learned scale, or None (no scale; always plain PyTorch, as diffusers does).
      eps: added to the mean square (ContentV QK norm: 1e-6).
      bias: optional (D,) shift added after the scale.
      backend: None (automatic), ``"npu"`` or ``"torch"``.
    Returns:
      (..., D): the weight's dtype when a half-precision weight is given, else the promoted dtype of x
      and weight (x's dtype when weight is None).
    Raises:
      ValueError: weight's shape is not (D,); unknown backend.
      torch_npu_backend.device.NPUUnavailableError: the NPU backend without torch_npu / CANN.
    """
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}; got {tuple(weight.shape)}")
    if weight is not None and resolve_backend(x, backend) == "npu":
        torch_npu = require_torch_npu()
        y = torch_npu.npu_rms_norm(x.to(weight.dtype), weight, epsilon=eps)[0]
    else:
        input_dtype = x.dtype
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(variance + eps)
        if weight is None:
            y = y.to(input_dtype)
        else:
            if weight.dtype in (torch.float16, torch.bfloat16):
                y = y.to(weight.dtype)
            y = y * weight
    if bias is not None:
        y = y + bias
    return y
