"""The RLHF gradient through the official ContentV pipeline's logic in PyTorch (autograd), a test reference.

Sampling as ``ContentVPipeline.__call__`` (github bytedance/ContentV, ``contentv_pipeline.py``): diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=np.linspace(1, 0, N + 1)[:-1])``, the conditional and
unconditional transformer passes one after the other, ``scheduler.step``. RLHF as the ContentV report (arXiv
2506.05343) section 6.2 describes it: on the chosen steps the transformer runs with gradient on its input
``latents.detach()`` (the other steps under ``torch.no_grad``), the first latent frame is decoded by
``AutoencoderKLWan`` (``latents / (1 / std) + mean``, then diffusers' post-processing), a reward scores it and
``loss.backward()`` gives the parameter gradient. Layout is the official one: latents (B, C, T, H, W).
"""

from __future__ import annotations

import numpy as np
import torch


def official_rlhf_grad(transformer, scheduler, vae, reward, latents, embeds, num_steps, guidance_scale, chosen,
                       *, reward_scale=1.0):
    """Returns ``(loss, rewards (B,), {parameter name: gradient})`` as NumPy float32.

    Args:
      transformer: ContentV's PyTorch transformer (``torch_npu_backend``), float32.
      scheduler: ``FlowMatchEulerDiscreteScheduler`` with the run's shift.
      vae: diffusers ``AutoencoderKLWan``.
      reward: ``reward(frames (B, H, W, 3) torch float32 in [0, 1]) -> (B,)``, differentiable.
      latents: initial noise (B, C, T, h, w) torch float32.
      embeds: (prompt_embeds, pooled, negative_embeds, negative_pooled) torch float32.
      chosen: the step indices that carry gradient.
    """
    pe, pp, ne, npool = embeds
    transformer.zero_grad(set_to_none=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device="cpu")
    chosen = {int(c) for c in chosen}
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(latents.shape[0])
        with torch.enable_grad() if i in chosen else torch.no_grad():
            x_in = latents.detach()
            noise_pred = transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=pe,
                                     pooled_projections=pp, return_dict=False)[0]
            if guidance_scale > 1.0:
                uncond = transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=ne,
                                     pooled_projections=npool, return_dict=False)[0]
                noise_pred = uncond + guidance_scale * (noise_pred - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    video = vae.decode(latents[:, :, :1] / inv_std + mean, return_dict=False)[0]  # (B, 3, 1, H, W), clamped
    frames = (video / 2 + 0.5).clamp(0, 1)[:, :, 0].permute(0, 2, 3, 1)
    r = reward(frames)
    loss = (-reward_scale * r).mean()
    loss.backward()
    grads = {n: p.grad.detach().float().numpy() for n, p in transformer.named_parameters() if p.grad is not None}
    return float(loss), r.detach().numpy(), grads


def color_reward(color=(1.0, 0.5, 0.0)):
    """PyTorch twin of ``contentv_jax.train.rlhf.ColorReward``: ``-mean((frame - color)^2)`` per sample."""
    target = torch.tensor(color, dtype=torch.float32)

    def reward(frames):
        return -((frames - target) ** 2).mean(dim=(1, 2, 3))

    return reward
