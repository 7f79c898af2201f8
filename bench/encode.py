"""Encode-stage benchmark: the stages one after another against the overlapped stage, same run.

Usage: ``python bench/encode.py [--data ../shared/data/videos] [--vae tiny wan2.1] [--max-frames 17]
[--size 128] [--max-clips 2] [--repeats 2]``

What runs: :func:`contentv_jax.data.encode.encode_dataset` on the clips of ``--data`` (default the
shared test videos: five clips of 6-10 s, 640x360 to 1280x720), buckets up to ``--max-frames`` x
``--size`` x ``--size`` at 8 fps, with tiny random text encoders (the real CLIP-L/G + T5-XXL do not fit
this machine's budget; the text stage is therefore small here) and the VAE of each ``--vae`` config,
random init (``tiny``: the tests' VAE; ``wan2.1``: the real Wan2.1 architecture, float32).

Method: one untimed warm-up encode (it compiles the VAE for every bucket shape and warms torch), then
``--repeats`` pairs of timed encodes, serial (``decode_workers=0``: decode, VAE, text and write in one
thread, one after another) and overlapped (``decode_workers=2``: grain read threads decode ahead of the
VAE, the text encoder and the writer on a thread each), alternating. Each encode reports its wall time and
the seconds spent in each stage (``EncodeStats.stage_seconds``). The medians are reported.

Limits printed next to the figures: the serial wall time is bounded below by the sum of the stages; an
overlapped stage is bounded below by its slowest stage alone (the serial run's largest stage time). The
goal: overlapped wall <= 1.15x that slowest stage. The records of both modes are checked equal.

Prints a table, then as its LAST line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "videos"


def _load(out: Path) -> list:
    from array_record.python.array_record_module import ArrayRecordReader

    from contentv_jax.data.encode import decode_record

    recs = []
    for f in sorted(out.glob("*.array_record")):
        r = ArrayRecordReader(str(f))
        recs += [decode_record(b) for b in r.read_all()]
        r.close()
    return recs


def bench_config(name: str, args, text, tmp: Path) -> dict:
    import numpy as np

    from contentv_jax.data.encode import encode_dataset
    from contentv_jax.models.vae import get_config, init_vae

    vae = init_vae(get_config(name), seed=0)
    kw = dict(fps=8.0, max_frames=args.max_frames, max_height=args.size, max_width=args.size,
              max_clips_per_video=args.max_clips, max_sequence_length=16, progress=False)
    t = time.perf_counter()
    encode_dataset(args.data, tmp / f"{name}-warmup", vae, text, decode_workers=0, **kw)
    warmup = time.perf_counter() - t
    runs = {"serial": [], "overlapped": []}
    last = {}
    for r in range(args.repeats):
        for mode, workers in (("serial", 0), ("overlapped", 2)):
            out = tmp / f"{name}-{mode}-{r}"
            load = os.getloadavg()[0]
            t = time.perf_counter()
            stats = encode_dataset(args.data, out, vae, text, decode_workers=workers, **kw)
            wall = time.perf_counter() - t
            runs[mode].append({"wall_s": wall, "stages_s": dict(stats.stage_seconds), "clips": stats.records,
                               "load": load})
            last[mode] = out
    a, b = _load(last["serial"]), _load(last["overlapped"])
    same = len(a) == len(b) and all(
        x["meta"] == y["meta"] and all(np.array_equal(x[k], y[k]) for k in ("latents", "prompt_embeds", "pooled"))
        for x, y in zip(a, b))

    def med(mode, f):
        return statistics.median(f(x) for x in runs[mode])

    stages = {k: med("serial", lambda x, k=k: x["stages_s"][k]) for k in runs["serial"][0]["stages_s"]}
    serial, overlapped = med("serial", lambda x: x["wall_s"]), med("overlapped", lambda x: x["wall_s"])
    slowest = max(stages, key=stages.get)
    clips = runs["serial"][0]["clips"]
    return {
        "vae": name, "clips": clips, "warmup_s": warmup, "records_equal": bool(same),
        "serial_s": serial, "overlapped_s": overlapped, "stages_serial_s": stages,
        "stages_overlapped_s": {k: med("overlapped", lambda x, k=k: x["stages_s"][k]) for k in stages},
        "sum_of_stages_s": sum(stages.values()), "slowest_stage": slowest, "slowest_stage_s": stages[slowest],
        "overlapped_over_slowest": overlapped / stages[slowest], "overlapped_over_serial": overlapped / serial,
        "clips_per_s_serial": clips / serial, "clips_per_s_overlapped": clips / overlapped,
        "loads": [x["load"] for m in runs for x in runs[m]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a directory of clips and captions.jsonl")
    p.add_argument("--vae", nargs="+", default=["tiny", "wan2.1"], choices=["tiny", "wan2.1"])
    p.add_argument("--max-frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="largest bucket height and width")
    p.add_argument("--max-clips", type=int, default=2, help="clips per video")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.data / "captions.jsonl").is_file():
        p.error(f"--data {args.data}: no captions.jsonl there (the shared test videos are ../shared/data/videos)")
    if args.repeats < 1 or args.max_frames < 1 or args.size < 16:
        p.error("--repeats and --max-frames must be >= 1 and --size >= 16")

    from contentv_jax.text import TextEncoders, build_tiny_text_encoders

    results = []
    print(f"machine: {os.cpu_count()} CPUs; load before {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_tiny_text_encoders(tmp / "text", clip_dims=(32, 32), t5_dim=64, seed=0)
        text = TextEncoders.from_pretrained(tmp / "text")
        for name in args.vae:
            results.append(bench_config(name, args, text, tmp))
    print(f"load after {os.getloadavg()}")
    print(f"\n{'vae':8} {'clips':>5} {'serial s':>9} {'overlap s':>9} {'decode':>7} {'vae':>7} {'text':>7} {'write':>7} "
          f"{'sum':>7} {'ovl/slowest':>11} {'ovl/serial':>10} {'equal':>5}")
    for r in results:
        s = r["stages_serial_s"]
        print(f"{r['vae']:8} {r['clips']:5d} {r['serial_s']:9.2f} {r['overlapped_s']:9.2f} {s['decode']:7.2f} "
              f"{s['vae']:7.2f} {s['text']:7.2f} {s['write']:7.2f} {r['sum_of_stages_s']:7.2f} "
              f"{r['overlapped_over_slowest']:11.2f} {r['overlapped_over_serial']:10.2f} {str(r['records_equal']):>5}")
    print("(stage columns: seconds in each stage in the serial run, i.e. each stage alone; goal ovl/slowest <= 1.15)")
    print(json.dumps({"bench": "encode", "args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    return 0 if all(r["records_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
