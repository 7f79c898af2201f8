"""Wan2.1 VAE benchmark: encode / decode time and peak memory, JAX (ours) vs diffusers ``AutoencoderKLWan``.

Usage: ``python bench/vae.py [--frames 17 33] [--size 128] [--mem-frames 17 65] [--warmup 1] [--repeats 3]
[--ops encode decode]``

Model: the real Wan2.1 config (``../shared/data/configs/wan2.1-vae/config.json``, or diffusers' defaults,
which are the same), random init with a fixed seed, float32, saved once with ``save_pretrained``; our
model loads that directory (``load_vae``), so both sides hold identical weights. Inputs: encode gets
random pixels ``(1, T, S, S, 3)`` in [-1, 1]; decode gets random latents ``(1, (T - 1) / 4 + 1, S/8, S/8, 16)``.
Both use their default chunking (first frame alone, then 4 frames / one latent frame per chunk).

Method (each measurement in a fresh subprocess, so nothing one measurement allocates or caches can
hide in another's numbers; the workers run one after the other, never side by side):
- Time: JAX compiles ahead of time (``jit(...).lower(...).compile()``, the executable that
  ``WanVAE.encode`` / ``decode`` run), then ``--warmup`` untimed runs, then ``--repeats`` timed runs
  (``block_until_ready``); torch runs ``--warmup`` untimed then ``--repeats`` timed calls under
  ``torch.no_grad()``. The median is reported. Torch uses all CPU threads, as XLA does.
- Peak memory (RSS): workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0``
  so that glibc maps every buffer of 64 KiB or more and returns it on free (RSS then tracks live
  memory instead of what the allocator kept). After the model and the input are in memory (and, for
  JAX, after compilation) the worker resets the kernel's high-water mark
  (``echo 5 > /proc/self/clear_refs``), records ``VmRSS``, runs the warm-up and timed calls, and
  reports ``VmHWM - VmRSS_before``: the peak memory the calls added on top of weights and input,
  outputs included. The window opens before the first run because later runs may reuse memory a
  runtime kept from an earlier one.
- For JAX it also reports XLA's own buffer assignment of the compiled executable
  (``compiled.memory_analysis()``: ``temp_size_in_bytes`` scratch and ``output_size_in_bytes``), which is
  exact and independent of the allocator.
- The memory check of issue 3: our decode peak for ``--mem-frames`` (17 and 65 frames at S x S) must
  stay below 1.5x the 17-frame figure; both the RSS and the XLA figures are reported.

Prints a table, then as its LAST line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = ROOT.parent / "shared" / "data" / "configs" / "wan2.1-vae" / "config.json"
MiB = 2**20


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status()["VmRSS"]


def _inputs(op: str, frames: int, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    if op == "encode":
        return (rng.random((1, frames, size, size, 3), dtype=np.float32) * 2 - 1).astype(np.float32)
    return rng.standard_normal((1, (frames - 1) // 4 + 1, size // 8, size // 8, 16), dtype=np.float32)


def worker(args) -> dict:
    """One (impl, op, frames) measurement in this process; returns the figures."""
    x = _inputs(args.op, args.frames, args.size, args.seed)
    res = {"impl": args.impl, "op": args.op, "frames": args.frames, "size": args.size}
    if args.impl == "jax":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        sys.path.insert(0, str(ROOT))
        from contentv_jax.checkpoints import load_vae
        from contentv_jax.models import vae as vae_mod

        model = load_vae(args.model)
        graphdef, state = nnx.split(model)
        xj = jnp.asarray(x)
        fn = vae_mod._encode_jit if args.op == "encode" else vae_mod._decode_jit
        t0 = time.perf_counter()
        compiled = fn.lower(graphdef, state, xj).compile()
        res["compile_s"] = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        res["xla_temp_mib"] = ma.temp_size_in_bytes / MiB
        res["xla_output_mib"] = ma.output_size_in_bytes / MiB

        def run():
            jax.block_until_ready(compiled(graphdef, state, xj))

    else:
        import torch
        from diffusers import AutoencoderKLWan

        torch.set_num_threads(os.cpu_count())
        model = AutoencoderKLWan.from_pretrained(args.model).eval()
        xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())

        def run():
            with torch.no_grad():
                if args.op == "encode":
                    model.encode(xt).latent_dist.mean.sum()
                else:
                    model.decode(xt).sample.sum()

    # The peak window opens before the first run (warm-up included): a run after another may reuse
    # memory the runtime kept, so only the first run shows every allocation.
    before = _reset_peak()
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    res["peak_growth_mib"] = (_proc_status()["VmHWM"] - before) / MiB
    res["times_s"] = times
    res["median_s"] = statistics.median(times)
    return res


def _spawn(model_dir: str, impl: str, op: str, frames: int, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, __file__, "--worker", "--impl", impl, "--op", op, "--frames", str(frames),
        "--size", str(args.size), "--model", model_dir, "--warmup", str(args.warmup),
        "--repeats", str(args.repeats), "--seed", str(args.seed),
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {impl} {op} {frames} failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {impl:5s} {op:6s} {frames:3d} frames: median {res['median_s']:.2f} s, "
          f"peak +{res['peak_growth_mib']:.0f} MiB", flush=True)  # fmt: skip
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33], help="pixel frames (4k+1) timed, both impls")
    p.add_argument("--mem-frames", type=int, nargs="+", default=[17, 65], help="our decode memory check")
    p.add_argument("--size", type=int, default=128, help="frame height and width in pixels")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.frames = args.frames[0] if isinstance(args.frames, list) else args.frames
        print(json.dumps(worker(args)))
        return 0
    for f in [*args.frames, *args.mem_frames]:
        if f % 4 != 1:
            raise SystemExit(f"--frames / --mem-frames must be 4k+1, got {f}")

    import torch
    from diffusers import AutoencoderKLWan

    config = json.loads(REAL_CONFIG.read_text()) if REAL_CONFIG.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bench_vae_") as tmp:
        torch.manual_seed(args.seed)
        AutoencoderKLWan.from_config(config).save_pretrained(tmp)
        print(f"Wan2.1 VAE (real config, random init seed {args.seed}), {args.size}x{args.size}, float32, "
              f"{os.cpu_count()} CPU threads; warmup {args.warmup}, repeats {args.repeats}", flush=True)  # fmt: skip
        results = []
        for frames in args.frames:
            for op in args.ops:
                for impl in args.impls:
                    results.append(_spawn(tmp, impl, op, frames, args))
        mem = {}
        if "jax" in args.impls:
            for frames in args.mem_frames:
                hit = [r for r in results if r["impl"] == "jax" and r["op"] == "decode" and r["frames"] == frames]
                mem[frames] = hit[0] if hit else _spawn(tmp, "jax", "decode", frames, args)

    def find(impl, op, frames):
        hit = [r for r in results if (r["impl"], r["op"], r["frames"]) == (impl, op, frames)]
        return hit[0] if hit else None

    print()
    print(f"{'op':7s}{'frames':>7s} | {'jax s':>8s} {'torch s':>8s} {'speedup':>8s} | "
          f"{'jax MiB':>8s} {'torch MiB':>9s} {'jax/torch':>9s} {'XLA temp':>9s}")  # fmt: skip
    rows = []
    for frames in args.frames:
        for op in args.ops:
            j, t = find("jax", op, frames), find("torch", op, frames)
            row = {
                "op": op,
                "frames": frames,
                "jax_s": j and j["median_s"],
                "torch_s": t and t["median_s"],
                "speedup": (t["median_s"] / j["median_s"]) if (j and t) else None,
                "jax_peak_mib": j and j["peak_growth_mib"],
                "torch_peak_mib": t and t["peak_growth_mib"],
                "jax_xla_temp_mib": j and j["xla_temp_mib"],
                "peak_ratio_jax_torch": (j["peak_growth_mib"] / t["peak_growth_mib"]) if (j and t) else None,
                "time_ratio_jax_torch": (j["median_s"] / t["median_s"]) if (j and t) else None,
            }
            rows.append(row)

            def f(v, fmt):
                return format(v, fmt) if v is not None else "-"

            print(f"{op:7s}{frames:>7d} | {f(row['jax_s'], '8.2f')} {f(row['torch_s'], '8.2f')} "
                  f"{f(row['speedup'], '8.2f')} | {f(row['jax_peak_mib'], '8.0f')} {f(row['torch_peak_mib'], '9.0f')} "
                  f"{f(row['peak_ratio_jax_torch'], '9.2f')} {f(row['jax_xla_temp_mib'], '9.0f')}")  # fmt: skip
    summary = {"size": args.size, "rows": rows, "warmup": args.warmup, "repeats": args.repeats}
    if mem:
        lo, hi = min(mem), max(mem)
        rss_ratio = mem[hi]["peak_growth_mib"] / mem[lo]["peak_growth_mib"]
        xla = {k: v["xla_temp_mib"] + v["xla_output_mib"] for k, v in mem.items()}
        xla_ratio = xla[hi] / xla[lo]
        print()
        print(f"our decode peak memory at {args.size}x{args.size}:")
        for k in sorted(mem):
            print(f"  {k:3d} frames: RSS +{mem[k]['peak_growth_mib']:.0f} MiB, XLA temp {mem[k]['xla_temp_mib']:.0f} MiB "
                  f"+ output {mem[k]['xla_output_mib']:.1f} MiB")  # fmt: skip
        ok = rss_ratio < 1.5 and xla_ratio < 1.5
        print(f"  {hi}/{lo} frames ratio: RSS {rss_ratio:.2f}, XLA {xla_ratio:.2f} (must be < 1.5: {'ok' if ok else 'FAIL'})")
        summary["decode_memory"] = {
            str(k): {"rss_peak_growth_mib": v["peak_growth_mib"], "xla_temp_mib": v["xla_temp_mib"],
                     "xla_output_mib": v["xla_output_mib"]}
            for k, v in mem.items()
        }  # fmt: skip
        summary["decode_memory_ratio"] = {"rss": rss_ratio, "xla": xla_ratio, "ok": ok}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
