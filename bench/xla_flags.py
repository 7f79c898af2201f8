"""XLA:CPU's GEMM under its own library paths and flags, against torch's oneDNN in the same process.

Each configuration of ``XLA_FLAGS`` (``--configs``, by name) runs in its own subprocess: a float32 matmul at
the transformer benchmark's FFN shape (653 x 512 x 2048, ``bench/transformer.py``) and at 1024^3, XLA
(``jax.jit(jnp.dot)``) and ``torch.mm`` interleaved, each timed call after one untimed call of its own
(``bench/timing.py``), median of ``--repeats``; the ratio XLA / torch rate is the
figure (load hits both alike), and ``max_abs_diff`` checks XLA's product against NumPy's. A flag this jaxlib
does not know ends the subprocess: recorded as an error. The configurations are XLA:CPU's library-fusion
switches (XNNPACK: ``xnn``, its successor ``ynn``; oneDNN) and fast math, as found in jaxlib 0.10's strings.

    python bench/xla_flags.py [--configs default no_ynn ...] [--repeats 15]

Prints a table, then one JSON line as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "default": "",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "no_thunks": "--xla_cpu_use_thunk_runtime=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
SHAPES = ((653, 512, 2048), (1024, 1024, 1024))


def worker(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bench.timing import interleaved

    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in SHAPES:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        f = jax.jit(jnp.dot)
        r = np.asarray(f(ja, jb))
        err = float(np.abs(r - a @ b).max() / np.abs(a @ b).max())
        torch.mm(ta, tb)
        ts = interleaved({"xla": lambda: f(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}, repeats)
        g = {s: 2 * m * k * n / statistics.median(v) / 1e9 for s, v in ts.items()}
        hlo = f.lower(ja, jb).compile().as_text()
        kind = "ynn" if "__ynn_fusion" in hlo else "xnn" if "__xnn_fusion" in hlo else "onednn" if "onednn" in hlo.lower() else "xla"
        out[f"{m}x{k}x{n}"] = {"xla_gflops": g["xla"], "torch_gflops": g["torch"], "xla_over_torch": g["xla"] / g["torch"],
                               "max_rel_err": err, "dot_path": kind}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return 0
    load0 = os.getloadavg()
    res = {}
    for name in args.configs:
        env = dict(os.environ, XLA_FLAGS=CONFIGS[name])
        try:
            r = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)], env=env,
                               capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            res[name] = json.loads(lines[-1]) if r.returncode == 0 and lines else {
                "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            res[name] = {"error": f"timeout after {args.timeout} s"}
        res[name]["loadavg"] = os.getloadavg()
    load1 = os.getloadavg()
    print(f"XLA:CPU float32 GEMM by XLA_FLAGS configuration vs torch.mm (oneDNN) in the same process; median of {args.repeats}")
    print(f"load average before {tuple(round(x, 2) for x in load0)}, after {tuple(round(x, 2) for x in load1)}")
    print(f"{'config':<20}" + "".join(f"{s:>34}" for s in (f'{m}x{k}x{n}' for m, k, n in SHAPES)))
    print(f"{'':<20}" + f"{'xla  torch GFLOP/s  xla/torch path':>34}" * len(SHAPES))
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<20}  error: {r['error']}")
            continue
        row = ""
        for m, k, n in SHAPES:
            c = r[f"{m}x{k}x{n}"]
            row += f"{c['xla_gflops']:>9.1f}{c['torch_gflops']:>7.1f}{c['xla_over_torch']:>11.2f}{c['dot_path']:>7}"
        print(f"{name:<20}{row}")
    print(json.dumps({"bench": "xla_flags", "flags": {k: CONFIGS[k] for k in args.configs}, "results": res,
                      "loadavg_before": load0, "loadavg_after": load1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
