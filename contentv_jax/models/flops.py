"""Closed-form matmul FLOPs of the MM-DiT (model FLOPs for MFU and TFLOP/s; hardware FLOPs for the step time).

Used by the trainer (``train/model_tflops_per_device`` next to tokens/s) and ``bench/scale_plan.py`` (which checks the
closed form against XLA's ``cost_analysis()`` on a loop-free variant).
"""

from __future__ import annotations


def _attn_len(tokens: int, kernel: str, chunk: int = 512) -> int:
    """Joint-attention length the kernel computes over (the chunked kernel pads to a multiple of its chunk)."""
    return -(-tokens // chunk) * chunk if kernel == "chunked" else tokens


def closed_form_flops(cfg, video_tokens: int, text_tokens: int, batch: int, *, sequence: int = 1) -> dict:
    """Matmul FLOPs (2 per multiply-add) of the MM-DiT, checked term by term against the model code.

    Per sample, with S video tokens, L text tokens, width d, FFN width f = 4d, n heads x hd:
      each of the ``num_layers - 1`` scanned (full) blocks:
        AdaLN-zero modulation, video and text: 2 x 2 d (6d)  (per sample: temb is (B, d), not per token)
        q, k, v projections, video and text: 3 x 2 (S + L) d^2; output projections to_out, to_add_out: 2 (S + L) d^2
        joint attention QK^T and PV: 2 x 2 (S + L)^2 d
        FFNs, video and text: 2 x 2 (S + L) d f
      the final ``context_pre_only`` block: AdaLN-zero (video) 2 d (6d) + AdaLN-continuous (text) 2 d (2d);
        q, k, v for both 6 (S + L) d^2; attention 4 (S + L)^2 d; to_out and FFN for video only
        (no to_add_out, no ff_context): 2 S d^2 + 4 S d f
      embedders: patch embed 2 S (p^2 C_in) d; context embedder 2 L 4096 d; timestep MLP 2 (256 d + d^2);
        pooled MLP 2 (2048 d + d^2); norm_out 2 d (2d); proj_out 2 S d (p^2 C_out).

    Returns ``forward`` (one forward), ``model_train`` = 3 x forward (backward = 2 x forward; the
    MFU convention, no recomputation), and ``hardware_train``: what the compiled step executes with
    ``cfg.remat_policy`` and ``cfg.attention_kernel`` -- full remat re-runs the scanned blocks'
    forward; the chunked (FlashAttention-2) backward recomputes QK^T (attention backward 2.5 x its
    forward); the chunked kernel pads the joint sequence to a multiple of 512; Ulysses over
    ``sequence`` devices pads the heads to a multiple of it (38 -> 40 at 4 or 8).
    """
    d, f, p = cfg.width, cfg.ffn_dim, cfg.patch_size
    n, hd = cfg.num_attention_heads, cfg.attention_head_dim
    s, t = video_tokens, text_tokens
    tok = s + t
    scanned = cfg.num_layers - 1

    def block_linear(final: bool) -> int:
        if final:
            return 2 * d * 6 * d + 2 * d * 2 * d + 6 * tok * d * d + 2 * s * d * d + 4 * s * d * f
        return 2 * 2 * d * 6 * d + 8 * tok * d * d + 4 * tok * d * f

    attn_model = 4 * tok * tok * d  # per block
    n_pad = -(-n // sequence) * sequence if sequence > 1 else n
    lp = _attn_len(tok, cfg.attention_kernel)
    attn_hw = 4 * lp * lp * hd * n_pad
    embed = (2 * s * p * p * cfg.in_channels * d + 2 * t * cfg.joint_attention_dim * d + 2 * (256 * d + d * d)
             + 2 * (cfg.pooled_projection_dim * d + d * d) + 2 * d * 2 * d + 2 * s * d * p * p * cfg.out_channels)
    fwd = scanned * (block_linear(False) + attn_model) + block_linear(True) + attn_model + embed
    bwd_attn_factor = 2.5 if cfg.attention_kernel == "chunked" else 2.0
    blk_hw = block_linear(False) + attn_hw
    fin_hw = block_linear(True) + attn_hw
    fwd_hw = scanned * blk_hw + fin_hw + embed
    bwd_hw = 2 * fwd_hw + (bwd_attn_factor - 2.0) * attn_hw * (scanned + 1)
    remat_hw = scanned * blk_hw if cfg.remat_policy != "none" else 0
    return {
        "forward": batch * fwd,
        "model_train": batch * 3 * fwd,
        "hardware_train": batch * (fwd_hw + bwd_hw + remat_hw),
        "attention_share": (scanned + 1) * attn_model / fwd,
    }


def train_step_flops(cfg, latents_shape, text_tokens: int) -> float:
    """Model FLOPs (3 x forward, the MFU convention) of one train step on a latent batch ``(B, T, H, W, C)``.

    Video tokens per sample: ``T * (H / p) * (W / p)`` with ``p = cfg.patch_size``.
    """
    b, t, h, w, _ = latents_shape
    p = cfg.patch_size
    return float(closed_form_flops(cfg, t * (h // p) * (w // p), text_tokens, b)["model_train"])
