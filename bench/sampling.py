"""Benchmark (issue 8): a full sampling run, JAX pipeline vs the official ContentV logic in PyTorch.

A tiny random ContentV directory (``tests/sample_fixtures.py``: the diffusers-layout transformer, Wan VAE and
scheduler), the same initial latents and prompt embeddings; ``--steps`` (20) Euler steps with classifier-free
guidance, then the VAE decode. PyTorch runs the official pipeline's logic (``tests/official_sampling.py``:
sequential CFG passes, ``FlowMatchEulerDiscreteScheduler``, ``AutoencoderKLWan``); JAX runs
``contentv_jax.pipeline`` (both CFG branches in one batched forward, the whole loop one compiled ``fori_loop``).
Each side is timed ``--repeats`` times after ``--warmup`` runs (JAX's first run compiles; reported apart),
the two sides' calls interleaved; medians are reported,
for the denoising loop, the decode and the total, plus the agreement of the final latents.

    python bench/sampling.py [--frames 17 --height 128 --width 128 --steps 20 --repeats 3]

Prints a table, then one JSON line as its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from contentv_jax import pipeline as pl  # noqa: E402
from contentv_jax.checkpoints import load_vae  # noqa: E402
from contentv_jax.scheduler import sampling_sigmas, scheduler_shift  # noqa: E402
from tests.official_sampling import official_decode, official_denoise  # noqa: E402
from tests.sample_fixtures import build_tiny_model_dir, load_reference  # noqa: E402


def _side_by_side(fns: dict, warmup: int, repeats: int):
    """Each callable's last output, its first-call seconds (JAX: compile + run) and its median seconds
    over ``repeats`` timed calls after ``warmup`` untimed ones; the calls are interleaved
    (a, b, a, b, ...) so that both sides see the same machine load, and each timed call comes right
    after one untimed call of its own, so that the other library's spinning workers are idle by then
    (``bench/timing.py``)."""
    outs, first, times = {}, {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        outs[k] = fn()
        first[k] = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        for k, fn in fns.items():
            outs[k] = fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()  # settle (bench/timing.py)
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return outs, first, {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "tiny", text_encoders=False)
        shift = scheduler_shift(model_dir / "scheduler" / "scheduler_config.json")
        sigmas = sampling_sigmas(args.steps, shift)
        rng = np.random.default_rng(0)
        b = args.batch
        embeds = pl.PromptEmbeds(*(rng.normal(size=s).astype(np.float32) for s in [(b, 333, 64), (b, 32)] * 2))
        shape = pl.latent_shape(b, pl.round_num_frames(args.frames), args.height, args.width)
        noise = pl.initial_noise(0, shape)

        # PyTorch: the official logic; JAX: our pipeline
        transformer, vae, scheduler = load_reference(model_dir)
        t_embeds = [torch.from_numpy(getattr(embeds, k)) for k in pl.PromptEmbeds.KEYS]
        t_noise = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()
        pipe = pl.ContentVPipeline.from_pretrained(model_dir, load_text_encoders=False, load_vae=False)
        jvae = load_vae(model_dir / "vae")
        outs, first_loop, med = _side_by_side({
            "torch": lambda: official_denoise(transformer, scheduler, t_noise, *t_embeds, args.steps, args.guidance_scale),
            "jax": lambda: np.asarray(pl.denoise(pipe.transformer, noise, embeds, sigmas, args.guidance_scale)),
        }, args.warmup, args.repeats)
        t_lat, j_lat, t_loop, j_loop = outs["torch"], outs["jax"], med["torch"], med["jax"]
        outs, first_dec, med = _side_by_side({
            "torch": lambda: official_decode(vae, t_lat),
            "jax": lambda: pl.decode_latents(jvae, j_lat),
        }, args.warmup, args.repeats)
        t_frames, j_frames, t_dec, j_dec = outs["torch"], outs["jax"], med["torch"], med["jax"]
        j_compile = first_loop["jax"] - j_loop + first_dec["jax"] - j_dec

    ref = t_lat.permute(0, 2, 3, 4, 1).numpy()
    lat_err = float(np.abs(j_lat - ref).max() / np.abs(ref).max())
    frame_err = float(np.abs(j_frames - t_frames).max() / np.abs(t_frames).max())
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    rows = [
        ("denoise loop", t_loop, j_loop),
        ("VAE decode", t_dec, j_dec),
        ("total", t_loop + t_dec, j_loop + j_dec),
    ]
    print(f"sampling, tiny ContentV: batch {b}, {pl.round_num_frames(args.frames)} frames {args.height}x{args.width} "
          f"({tokens} video tokens), {args.steps} steps, guidance {args.guidance_scale}, backend {jax.default_backend()}")
    print(f"{'stage':<14}{'torch (s)':>12}{'jax (s)':>12}{'jax/torch':>11}")
    for name, t, j in rows:
        print(f"{name:<14}{t:>12.3f}{j:>12.3f}{j / t:>11.2f}")
    print(f"JAX first call minus median (compile): {j_compile:.1f} s, not in the table; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats}, torch and JAX interleaved")
    print(f"agreement: final latents {lat_err:.2e}, frames {frame_err:.2e} (max abs err / max abs)")
    print(json.dumps({
        "bench": "sampling", "backend": jax.default_backend(), "batch": b, "frames": pl.round_num_frames(args.frames),
        "height": args.height, "width": args.width, "video_tokens": tokens, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "repeats": args.repeats,
        "torch_loop_s": t_loop, "jax_loop_s": j_loop, "torch_decode_s": t_dec, "jax_decode_s": j_dec,
        "torch_total_s": t_loop + t_dec, "jax_total_s": j_loop + j_dec,
        "speedup_total": (t_loop + t_dec) / (j_loop + j_dec),
        "jax_ratio_total": (j_loop + j_dec) / (t_loop + t_dec), "jax_ratio_loop": j_loop / t_loop,
        "jax_compile_s": j_compile, "torch_threads": torch.get_num_threads(), "latents_rel_err": lat_err, "frames_rel_err": frame_err,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
