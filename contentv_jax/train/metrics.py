"""Run logging: a tqdm progress bar, TensorBoard scalars (tensorboardX) and ``metrics.jsonl``.

Only the main process writes (``enabled=False`` elsewhere makes every method a no-op).
``metrics.jsonl`` holds one JSON object per logged step with the same figures as TensorBoard
(``step``, ``loss``, ``grad_norm``, ``lr``, ``steps_per_s``, ``tokens_per_s``, ...), flushed per line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    """Writes scalars to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tensorboard`` (when ``tensorboard``)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` at ``step``; non-finite values are written as JSON ``null`` and TB NaN."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if self._tb is not None:
                self._tb.add_scalar(f"train/{k}", v, int(step))
        self._jsonl.write(json.dumps(row) + "\n")

    def image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 image (or float in [0, 1]) to TensorBoard under ``tag`` (no-op without TensorBoard)."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def encoded_image(self, step: int, tag: str, data: bytes, height: int, width: int) -> None:
        """An already encoded image (PNG, or an animated GIF for a clip) to TensorBoard's image tab under ``tag``."""
        if not (self.enabled and self._tb is not None):
            return
        from tensorboardX.proto.summary_pb2 import Summary

        img = Summary.Image(height=int(height), width=int(width), colorspace=3, encoded_image_string=data)
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), int(step))

    def event(self, step: int, **fields) -> None:
        """A non-scalar record in ``metrics.jsonl`` (e.g. ``{"event": "nonfinite_loss"}``)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **fields}) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (scalar rows and events) in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A tqdm bar over training steps showing loss, steps/s and tokens/s (a no-op when disabled)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int, **postfix) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
