"""Benchmark: joint attention at real sequence lengths, our ``chunked`` kernel vs torch's SDPA on the same CPU.

One head group of ContentV's 38 heads x 64 (by default 5 heads: 38 padded to 40 over Ulysses' ``sequence`` = 8,
the heads one device attends to at Stage 3), batch 1, joint sequences of ``--tokens`` tokens (333 text tokens +
the rest video; Stage 3 is 41,472 + 333 = 41,805). Ours: ``contentv_jax.models.attention.joint_attention``
with ``kernel="chunked"`` (online softmax, FlashAttention-2 backward) under ``jax.jit``; torch:
``torch.nn.functional.scaled_dot_product_attention`` over the concatenated ``[video ; text]`` sequence (its CPU
flash kernel). Modes: forward, and forward + backward (gradient of ``sum(out * g)`` for a fixed random ``g``
with respect to q, k, v). Every (side, dtype, tokens, mode) runs in its own fresh subprocess, one after the other
(torch, ours, torch, ours, ...), with a timeout (``--timeout``), so a slow case costs bounded time. Each case
runs twice. The timed run, under the default allocator, reports the seconds of one call after one warm-up call
(ours also its compile, timed apart). The memory run, with glibc told to map every block over 64 KiB and to
give freed memory back (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, so the heap's free lists do not
count as use), reports the peak: the growth of the process's RSS high-water mark over the warm-up and timed
calls, on top of the inputs; for ours also XLA's own temporary buffer size from the compiled executable's
``memory_analysis()``. The two are apart because that allocator setting costs XLA's loop a page fault per
block it allocates (a quarter of its time at 16k tokens) and is no setting anyone trains under.

Also printed: the share of one Stage-3 block's matmul FLOPs that attention takes (closed form of
``bench/scale_plan.closed_form_flops``: attention 4 (S + L)^2 d against the block's projections and FFNs), and
the machine's measured float32 GEMM peak (``bench/roofline.py``) as the roofline of the achieved rates.

    python bench/attention.py [--tokens 8192 16384 --dtypes float32 bfloat16 --modes fwd fwd+bwd]
    python bench/attention.py --largest        # adds 41,805 tokens (Stage 3): minutes per case on 2 cores

Prints a table, then one JSON line as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE3_TOKENS = 41_472 + 333
TEXT_TOKENS = 333


def attention_share(tokens: int = STAGE3_TOKENS, width: int = 2432, ffn: int = 4 * 2432) -> float:
    """Attention's share of one full MM-DiT block's matmul FLOPs (closed form, per sample): QK^T and PV
    4 T^2 d against the AdaLN modulation 2 x 2 d (6d), q/k/v/out projections 8 T d^2 and FFNs 4 T d f."""
    attn = 4 * tokens * tokens * width
    linear = 2 * 2 * width * 6 * width + 8 * tokens * width * width + 4 * tokens * width * ffn
    return attn / (attn + linear)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(side: str, dtype: str, tokens: int, mode: str, heads: int, head_dim: int) -> dict:
    """One measurement in this process: ``{seconds, compile_s, peak_mib, xla_temp_mib}``."""
    import numpy as np

    rng = np.random.default_rng(0)
    s_img = tokens - TEXT_TOKENS
    arrs = [rng.standard_normal((1, n, heads, head_dim), dtype=np.float32) for n in (s_img,) * 3 + (TEXT_TOKENS,) * 3]
    g = rng.standard_normal((1, tokens, heads, head_dim), dtype=np.float32)
    out = {"side": side, "dtype": dtype, "tokens": tokens, "mode": mode}
    if side == "torch":
        import torch
        import torch.nn.functional as F

        tdt = getattr(torch, dtype)
        qi, ki, vi, qt, kt, vt = (torch.from_numpy(a).to(tdt) for a in arrs)
        # (B, S, N, D) -> (B, N, S, D), [video ; text]
        q, k, v = (torch.cat([a, b], 1).transpose(1, 2).contiguous().requires_grad_(mode != "fwd")
                   for a, b in ((qi, qt), (ki, kt), (vi, vt)))
        tg = torch.from_numpy(g).to(tdt).transpose(1, 2)
        base = _maxrss_mib()

        def call():
            if mode == "fwd":
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v)
            else:
                q.grad = k.grad = v.grad = None
                (F.scaled_dot_product_attention(q, k, v) * tg).sum().backward()

        call()  # warm-up, as ours
        t0 = time.perf_counter()
        call()
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = _maxrss_mib() - base
        out["threads"] = torch.get_num_threads()
        return out

    import jax
    import jax.numpy as jnp

    from contentv_jax.models.attention import joint_attention

    jdt = jnp.dtype(dtype)
    xs = [jnp.asarray(a, jdt) for a in arrs]
    jg = jnp.asarray(g, jdt)

    def fwd(*xs):
        oi, ot = joint_attention(*xs, kernel="chunked")
        return jnp.concatenate([oi, ot], 1)

    if mode == "fwd":
        fn = jax.jit(fwd)
    else:
        fn = jax.jit(jax.grad(lambda *xs: jnp.sum(fwd(*xs).astype(jnp.float32) * jg.astype(jnp.float32)),
                              argnums=tuple(range(6))))
    t0 = time.perf_counter()
    compiled = fn.lower(*xs).compile()
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out["xla_temp_mib"] = getattr(mem, "temp_size_in_bytes", 0) / 2**20
    base = _maxrss_mib()
    jax.block_until_ready(compiled(*xs))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*xs))
    out["seconds"] = time.perf_counter() - t0
    out["peak_mib"] = _maxrss_mib() - base
    return out


def run_case(side, dtype, tokens, mode, heads, head_dim, timeout) -> dict:
    """The timed run, then the memory run (module docstring), in fresh subprocesses; one dict of both."""
    timed = _run_worker(side, dtype, tokens, mode, heads, head_dim, timeout, memory=False)
    if "error" in timed:
        return timed
    mem = _run_worker(side, dtype, tokens, mode, heads, head_dim, timeout, memory=True)
    if "error" in mem:
        return mem
    return {**timed, **{k: mem[k] for k in ("peak_mib", "xla_temp_mib") if k in mem}}


def _run_worker(side, dtype, tokens, mode, heads, head_dim, timeout, memory) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, dtype, str(tokens), mode, str(heads), str(head_dim)]
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536") if memory else None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"side": side, "dtype": dtype, "tokens": tokens, "mode": mode, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"side": side, "dtype": dtype, "tokens": tokens, "mode": mode, "error": f"exit {r.returncode}: {tail}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--largest", action="store_true", help=f"also {STAGE3_TOKENS} tokens (Stage 3)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case (subprocess)")
    p.add_argument("--no-roofline", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        side, dtype, tokens, mode, heads, hd = args.worker
        print(json.dumps(worker(side, dtype, int(tokens), mode, int(heads), int(hd))))
        return 0
    tokens = sorted(set(args.tokens + ([STAGE3_TOKENS] if args.largest else [])))
    for t in tokens:
        if t <= TEXT_TOKENS:
            print(f"error: --tokens must exceed the {TEXT_TOKENS} text tokens, got {t}", file=sys.stderr)
            return 2
    load0 = os.getloadavg()
    results = []
    for dtype in args.dtypes:
        for t in tokens:
            for mode in args.modes:
                pair = {}
                for side in ("torch", "jax"):
                    pair[side] = run_case(side, dtype, t, mode, args.heads, args.head_dim, args.timeout)
                    pair[side]["loadavg"] = os.getloadavg()
                    results.append(pair[side])
                    print(f"  done {side} {dtype} {t} {mode}: {pair[side].get('seconds', pair[side].get('error'))}",
                          file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    peak = None
    if not args.no_roofline:
        from bench.roofline import measured_peak

        peak = measured_peak("float32", 1024)
    share = attention_share()
    print(f"joint attention, {args.heads} heads x {args.head_dim}, batch 1, {TEXT_TOKENS} text tokens; ours = chunked "
          f"kernel (jax.jit), torch = scaled_dot_product_attention; one subprocess per case")
    print(f"load average before {tuple(round(x, 2) for x in load0)}, after {tuple(round(x, 2) for x in load1)}")
    print(f"{'dtype':<9}{'tokens':>7} {'mode':<8}|{'torch s':>9}{'ours s':>9}{'ours/torch':>11} |{'torch MiB':>10}"
          f"{'ours MiB':>9}{'XLA temp':>9} | ours GFLOP/s")
    by = {(r["side"], r["dtype"], r["tokens"], r["mode"]): r for r in results}
    for dtype in args.dtypes:
        for t in tokens:
            for mode in args.modes:
                tr, jr = by[("torch", dtype, t, mode)], by[("jax", dtype, t, mode)]
                flops = 4 * t * t * args.head_dim * args.heads * (1 if mode == "fwd" else 3.5)
                ts, js = tr.get("seconds"), jr.get("seconds")
                fmt = lambda x, w=9, f=".2f": f"{x:>{w}{f}}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
                print(f"{dtype:<9}{t:>7} {mode:<8}|{fmt(ts)}{fmt(js)}{fmt(js / ts if ts and js else None, 11)} |"
                      f"{fmt(tr.get('peak_mib'), 10, '.0f')}{fmt(jr.get('peak_mib'), 9, '.0f')}"
                      f"{fmt(jr.get('xla_temp_mib'), 9, '.0f')} | {fmt(flops / js / 1e9 if js else None, 8, '.1f')}"
                      + "".join(f"  [{s}: {r['error']}]" for s, r in (("torch", tr), ("ours", jr)) if "error" in r))
    print("GFLOP/s counts 4 T^2 D N per forward and 3.5x that for forward + backward (the FlashAttention-2 "
          "backward recomputes QK^T); roofline (measured float32 GEMM peak): "
          + (f"{peak[0]:.1f} GFLOP/s ({peak[1]})" if peak else "not measured"))
    print(f"attention's share of one Stage-3 block's matmul FLOPs ({STAGE3_TOKENS} tokens, width 2432): {share:.3f}")
    print(json.dumps({"bench": "attention", "heads": args.heads, "head_dim": args.head_dim, "text_tokens": TEXT_TOKENS,
                      "results": results, "stage3_attention_flop_share": share,
                      "roofline_f32_gflops": peak[0] if peak else None, "loadavg_before": load0, "loadavg_after": load1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
