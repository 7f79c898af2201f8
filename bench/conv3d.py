"""Profile behind the VAE timings: one causal 3x3x3 convolution of the Wan2.1 decoder, XLA vs PyTorch.

The Wan VAE's time is almost all 3x3x3 convolutions (``bench/vae.py`` reports the decode's FLOPs and
rate). This times one such convolution at the decoder's shapes for a 128x128 video, decoding one
latent frame per chunk (the time axis holds the 2 cached frames plus the chunk's frames):

- ``xla conv``: ``jax.lax.conv_general_dilated`` channels-last (NDHWC x DHWIO), what ``WanVAE`` runs;
- ``xla 27 dots``: the same convolution as 27 shifted ``(pixels, C_in) @ (C_in, C_out)`` matmuls summed
  (XLA's CPU dot path, Eigen/oneDNN matmul), to separate the convolution emitter from the matmul speed;
- ``torch conv3d``: ``torch.nn.functional.conv3d`` (NCDHW), what diffusers' ``WanCausalConv3d`` runs
  (oneDNN / mkldnn on CPU).

All float32, same inputs, results checked to agree; medians of ``--repeats`` interleaved calls after
a warm-up, each timed call after one untimed call of its own (``bench/timing.py``). Prints a table, then one JSON line as its last line.

    python bench/conv3d.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import medians  # noqa: E402

# (name, frames in (2 cached + chunk), height, width, C_in, C_out): Wan2.1 decoder at 128x128 output
SHAPES = (
    ("mid 16x16 384", 3, 16, 16, 384, 384),
    ("up 32x32 384", 6, 32, 32, 384, 384),
    ("up 64x64 192", 6, 64, 64, 192, 192),
    ("up 128x128 96", 6, 128, 128, 96, 96),
)


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


def _dots(x, k):
    """Same as :func:`_conv` as 27 shifted matmuls."""
    _, t, h, w, _ = x.shape
    kt = k.shape[0]
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    to = t - kt + 1
    y = 0.0
    for a in range(kt):
        for b in range(3):
            for c in range(3):
                y = y + jnp.einsum("nthwi,io->nthwo", xp[:, a : a + to, b : b + h, c : c + w], k[a, b, c])
    return y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    conv, dots = jax.jit(_conv), jax.jit(_dots)
    rng = np.random.default_rng(0)
    rows = []
    print(f"3x3x3 convolution, float32, batch 1; JAX {jax.default_backend()}, torch {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    print(f"{'shape':16s}{'GFLOP':>8s} | {'xla conv ms':>12s}{'27 dots ms':>12s}{'torch ms':>10s} | "
          f"{'xla conv':>9s}{'27 dots':>9s}{'torch':>8s} GFLOP/s")
    for name, t, h, w, ci, co in SHAPES:
        x = rng.standard_normal((1, t, h, w, ci), dtype=np.float32)
        k = (rng.standard_normal((3, 3, 3, ci, co), dtype=np.float32) / np.sqrt(27 * ci)).astype(np.float32)
        xj, kj = jnp.asarray(x), jnp.asarray(k)
        xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
        kt = torch.from_numpy(k.transpose(4, 3, 0, 1, 2).copy())
        fns = {
            "xla_conv": lambda: conv(xj, kj).block_until_ready(),
            "xla_dots": lambda: dots(xj, kj).block_until_ready(),
            "torch": lambda: F.conv3d(xt, kt, padding=(0, 1, 1)),
        }
        ref = fns["torch"]().numpy().transpose(0, 2, 3, 4, 1)
        for key in ("xla_conv", "xla_dots"):
            out = np.asarray(conv(xj, kj) if key == "xla_conv" else dots(xj, kj))
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            if err > 1e-4:
                raise SystemExit(f"{name}: {key} disagrees with torch (rel err {err:.2e})")
        med = medians(fns, args.repeats)
        flops = 2 * (t - 2) * h * w * 27 * ci * co
        row = {"shape": name, "frames_in": t, "height": h, "width": w, "c_in": ci, "c_out": co, "flops": flops,
               **{f"{kk}_s": v for kk, v in med.items()}, **{f"{kk}_gflops": flops / v / 1e9 for kk, v in med.items()}}
        rows.append(row)
        print(f"{name:16s}{flops / 1e9:8.2f} | {med['xla_conv'] * 1e3:12.1f}{med['xla_dots'] * 1e3:12.1f}"
              f"{med['torch'] * 1e3:10.1f} | {row['xla_conv_gflops']:9.1f}{row['xla_dots_gflops']:9.1f}"
              f"{row['torch_gflops']:8.1f}")
    print(json.dumps({"bench": "conv3d", "backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
                      "repeats": args.repeats, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
