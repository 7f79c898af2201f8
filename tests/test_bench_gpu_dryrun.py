"""bench/gpu.sh --dry-run: the GPU suite runs end to end at tiny shapes on CPU and prints one JSON line."""

import json
import os
import subprocess
from pathlib import Path

from conftest import OPT_LEVEL_FLAG

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = OPT_LEVEL_FLAG  # one CPU device, as a lone GPU would be (and conftest's cheap compiles)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--parts", "train", "sampling",
                        "attention", "vae", "torch_sampling"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bench"] == "gpu_suite" and out["dry_run"] and out["errors"] == []
    # the train step's MFU is closed-form FLOPs over measured seconds, against 989 TFLOP/s
    tr = out["train"]
    assert tr["step_s"] > 0 and abs(tr["achieved_tflops"] - tr["model_tflop"] / tr["step_s"]) < 1e-9 * tr["achieved_tflops"] + 1e-12
    assert abs(tr["mfu_vs_989"] * 989.0 - tr["achieved_tflops"]) < 1e-9
    assert out["sampling"]["extrapolated_50_steps_s"] == 50 * out["sampling"]["per_step_s"]
    # chunked attention agrees with the xla kernel (bf16 inputs, float32 softmax)
    att = out["attention"]["256"]
    assert att["cudnn"] == {"skipped": "cudnn needs a GPU backend"}
    assert att["chunked"]["max_abs_diff_vs_xla"] < 2e-2
    # the tiny VAE decodes 2 latent frames of 8x8 into 5 frames of 64x64
    assert (out["vae"]["frames"], out["vae"]["height"], out["vae"]["width"]) == (5, 64, 64)
    assert out["torch_sampling"]["per_step_s"] > 0
