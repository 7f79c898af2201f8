"""Something to look at while training: sample fixed prompts every ``logging.sample_every`` steps.

:class:`PreviewSampler` embeds the ``sampling`` section's prompts (and its negative prompt) once, draws the initial
noise once (the official demo's seeded noise, ``contentv_jax.pipeline.initial_noise``), and at each preview step
runs the sampling pipeline's Euler loop with classifier-free guidance (``contentv_jax.pipeline.denoise``) on the
training mesh with the weights the run would export (the EMA when enabled). Every process takes part in the
sharded loop; process 0 alone decodes with the run's VAE and writes ``<run_dir>/samples/<step>/<i>-<prompt>.mp4``
(plus ``prompts.json``: file name -> prompt) and, to TensorBoard, ``samples/grid`` (one row per prompt, a few
frames each) and ``samples/clip_<i>`` (the clip as an animated GIF image).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from contentv_jax import pipeline as pl
from contentv_jax import scheduler as flow
from contentv_jax.runs import SAMPLES

GRID_FRAMES = 5  # frames per prompt in the TensorBoard grid (evenly spaced, first and last included)


def frame_grid(videos: np.ndarray, frames: int = GRID_FRAMES) -> np.ndarray:
    """(N, F, H, W, 3) float in [0, 1] -> one uint8 (N * H, k * W, 3) image: a row per video, ``k`` evenly spaced frames."""
    n, f, h, w, _ = videos.shape
    idx = np.unique(np.linspace(0, f - 1, min(frames, f)).round().astype(int))
    rows = [np.concatenate(list(v[idx]), axis=1) for v in videos]
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def gif_bytes(video: np.ndarray, fps: float) -> bytes:
    """(F, H, W, 3) float in [0, 1] -> an animated GIF (looping; PIL), as TensorBoard shows in its image tab."""
    from PIL import Image

    frames = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in video]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=max(int(1000 / fps), 20), loop=0)
    return buf.getvalue()


class PreviewSampler:
    """Samples ``cfg.sampling.prompts`` during training (see the module docstring).

    Args:
      cfg: the ``TrainConfig`` (``sampling``, ``logging.sample_every``, ``buckets``, ``data.fps``, ``text``).
      text_encoders: ``contentv_jax.text.TextEncoders`` of the run (used here once, then dropped).
      vae: the run's VAE on process 0 (None elsewhere: only process 0 decodes).
      latent_channels: the transformer's ``in_channels``.
      mesh: the training mesh. run_dir: where ``samples/`` goes. main: whether this is process 0.
    """

    def __init__(self, cfg, text_encoders, vae, *, latent_channels: int, mesh, run_dir: str | os.PathLike, main: bool):
        s, b = cfg.sampling, cfg.buckets
        self.every = int(cfg.logging.sample_every)
        self.prompts = list(s.prompts)
        self.mesh, self.vae, self.main = mesh, vae, main
        self.dir = Path(run_dir) / SAMPLES
        self.num_frames = s.num_frames or b.max_frames
        self.height, self.width = s.height or b.max_height, s.width or b.max_width
        self.fps = s.fps or cfg.data.fps
        self.guidance_scale = float(s.guidance_scale)
        length = cfg.text.max_length
        pe, pp = text_encoders.encode(self.prompts, max_sequence_length=length)
        ne, npool = text_encoders.encode([s.negative_prompt], max_sequence_length=length)
        n = len(self.prompts)
        self.embeds = pl.PromptEmbeds(
            np.asarray(pe, np.float32), np.asarray(pp, np.float32),
            np.repeat(np.asarray(ne, np.float32), n, axis=0), np.repeat(np.asarray(npool, np.float32), n, axis=0),
        )
        self.noise = pl.initial_noise(s.seed, pl.latent_shape(n, self.num_frames, self.height, self.width, latent_channels))
        self.sigmas = flow.sampling_sigmas(s.steps, s.shift)

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def __call__(self, step: int, model, logger=None) -> list[Path]:
        """Sample with ``model`` (the weights to export, sharded on the mesh); on process 0 write the mp4s and the
        TensorBoard summaries. Every process must call it at the same steps. Returns the written files."""
        latents = pl.denoise(model, self.noise, self.embeds, self.sigmas, self.guidance_scale, mesh=self.mesh)
        latents = np.asarray(latents)  # replicated: every process holds the whole array
        if not self.main:
            return []
        from contentv_jax.data.video import write_video
        from contentv_jax.outputs import safe_file_name, write_prompt_map

        videos = pl.decode_latents(self.vae, latents)
        out = self.dir / str(step)
        written = [write_video(out / safe_file_name(f"{i:02d}-{p}", ".mp4"), v, self.fps)
                   for i, (p, v) in enumerate(zip(self.prompts, videos))]
        write_prompt_map(out, {f.name: p for f, p in zip(written, self.prompts)})
        if logger is not None:
            logger.image(step, "samples/grid", frame_grid(videos))
            for i, v in enumerate(videos):
                logger.encoded_image(step, f"samples/clip_{i}", gif_bytes(v, self.fps), v.shape[1], v.shape[2])
            logger.event(step, event="samples", files=[str(f.relative_to(self.dir.parent)) for f in written])
        return written

