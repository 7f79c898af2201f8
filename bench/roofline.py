"""The roofline of this machine: measured and theoretical matmul peaks, float32 and bfloat16.

Measured peak: the best rate (GFLOP/s, 2 n^3 FLOPs per n x n x n product) that XLA (``jnp.dot`` under
``jax.jit``), torch (``torch.matmul``: oneDNN / MKL on CPU, cuBLAS on GPU) and NumPy (its BLAS; float32 only)
reach on large square GEMMs, the three libraries' calls interleaved, median over repeats. Theoretical peak:
cores x clock x FLOPs per cycle, the FLOPs per cycle from the CPU's flags in ``/proc/cpuinfo`` (vector width
from ``avx512f`` / ``avx2``; 2 FMA pipes per core; bfloat16 twice float32 only with ``avx512_bf16`` or
``amx_bf16``, else bfloat16 runs at float32's rate at best, through conversions). The clock is
``/proc/cpuinfo``'s ``cpu MHz`` (the nominal clock a VM reports; boost clocks can exceed it, so a measured
rate above the theoretical peak means the cores ran above that clock).

Other scripts import it: ``from bench.roofline import measured_peak`` and print "achieved / roofline".

    python bench/roofline.py [--sizes 1024 2048 --repeats 5 --dtypes float32 bfloat16]

Prints a table, then one JSON line as its last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """``{model, cores, mhz, flags}`` of the host CPU from ``/proc/cpuinfo`` (cores: ``os.sched_getaffinity``)."""
    try:
        text = open(path).read()
    except OSError:
        text = ""
    first = lambda key: (re.search(rf"^{key}\s*:\s*(.*)$", text, re.M) or [None, ""])[1].strip()  # noqa: E731
    mhz = first("cpu MHz")
    return {
        "model": first("model name") or "unknown",
        "cores": len(os.sched_getaffinity(0)),
        "mhz": float(mhz) if mhz else float("nan"),
        "flags": set(first("flags").split()),
    }


def theoretical_peak(dtype: str, info: dict | None = None) -> float:
    """Theoretical dense matmul peak in GFLOP/s: cores x GHz x (2 FMA pipes x 2 FLOPs x vector lanes).

    Lanes: 16 float32 with ``avx512f``, 8 with ``avx2``, 4 otherwise (SSE). ``bfloat16`` doubles that
    only with ``avx512_bf16`` or ``amx_bf16`` (AMX tiles counted as avx512_bf16: a lower bound).
    """
    info = info or cpu_info()
    flags = info["flags"]
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * 2 * lanes  # 2 FMA pipes, 2 FLOPs per FMA
    if dtype == "bfloat16" and ({"avx512_bf16", "amx_bf16"} & flags):
        per_cycle *= 2
    return info["cores"] * info["mhz"] / 1e3 * per_cycle


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def gemm_runners(n: int, dtype: str) -> dict:
    """``{library: callable}`` each computing one n x n x n product in ``dtype`` (and blocking on it)."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a32, b32 = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    jdt = jnp.dtype(dtype)
    ja, jb = jnp.asarray(a32, jdt), jnp.asarray(b32, jdt)
    jdot = jax.jit(jnp.dot)
    tdt = getattr(torch, dtype)
    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    ta, tb = (torch.from_numpy(x).to(dev, tdt) for x in (a32, b32))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def torch_mm():
        torch.matmul(ta, tb)
        sync()

    runners = {"xla": lambda: jdot(ja, jb).block_until_ready(), "torch": torch_mm}
    if dtype == "float32" and dev == "cpu":
        runners["numpy"] = lambda: a32 @ b32
    return runners


def measure(sizes=(2048,), dtypes=("float32", "bfloat16"), repeats: int = 5, warmup: int = 2, slow_s: float = 2.0) -> dict:
    """``{dtype: {"n": {library: GFLOP/s}}}``, medians over ``repeats`` interleaved calls per library, each
    after one untimed call of its own (``bench/timing.py``)
    (a library whose first timed call takes over ``slow_s`` seconds: that one call)."""
    out: dict = {}
    for dtype in dtypes:
        out[dtype] = {}
        for n in sizes:
            runners = gemm_runners(n, dtype)
            times = {k: [] for k in runners}
            for k, fn in list(runners.items()):
                # a library this slow (e.g. torch's bfloat16 on a CPU without bf16 instructions) is timed
                # once, by its first call (which for XLA includes the compile: an upper bound on its time)
                first = _time(fn, 1)
                if first[0] > slow_s:
                    times[k] = first
                    del runners[k]
                    continue
                for _ in range(warmup - 1):
                    fn()
            from bench.timing import interleaved

            for k, v in interleaved(runners, repeats).items():
                times[k] += v
            out[dtype][str(n)] = {k: 2 * n**3 / statistics.median(v) / 1e9 for k, v in times.items()}
    return out


@functools.lru_cache(maxsize=None)
def measured_peak(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> tuple[float, str]:
    """(GFLOP/s, library) of the fastest library on an n x n x n ``dtype`` GEMM on this machine (cached)."""
    rates = measure((n,), (dtype,), repeats)[dtype][str(n)]
    lib = max(rates, key=rates.get)
    return rates[lib], lib


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--slow-s", type=float, default=2.0, help="time a library once if one call takes longer")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import jax
    import torch

    load0 = os.getloadavg()
    info = cpu_info()
    res = measure(tuple(args.sizes), tuple(args.dtypes), args.repeats, slow_s=args.slow_s)
    load1 = os.getloadavg()
    print(f"roofline: {info['model']}, {info['cores']} cores at {info['mhz']:.0f} MHz (cpuinfo), "
          f"vector flags {sorted(f for f in info['flags'] if f.startswith(('avx', 'fma', 'amx')))}; "
          f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} {torch.get_num_threads()} threads")
    print(f"load average before {tuple(round(x, 2) for x in load0)}, after {tuple(round(x, 2) for x in load1)}")
    peaks = {}
    print(f"{'dtype':<10}{'n':>6}{'xla':>10}{'torch':>10}{'numpy':>10}   GFLOP/s (median of {args.repeats}, interleaved)")
    for dtype, by_n in res.items():
        for n, rates in by_n.items():
            print(f"{dtype:<10}{n:>6}" + "".join(f"{rates.get(k, float('nan')):>10.1f}" for k in ("xla", "torch", "numpy")))
        best = max(((r, f"{lib}@{n}") for n, rates in by_n.items() for lib, r in rates.items()))
        peaks[dtype] = {"measured_gflops": best[0], "measured_by": best[1], "theoretical_gflops": theoretical_peak(dtype, info)}
        print(f"{dtype}: measured peak {best[0]:.1f} GFLOP/s ({best[1]}), theoretical {peaks[dtype]['theoretical_gflops']:.1f} "
              f"GFLOP/s (measured/theoretical {best[0] / peaks[dtype]['theoretical_gflops']:.2f})")
    print(json.dumps({"bench": "roofline", "cpu": info["model"], "cores": info["cores"], "mhz": info["mhz"],
                      "rates_gflops": res, "peaks": peaks, "loadavg_before": load0, "loadavg_after": load1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
