"""The training data pipeline on grain: one bucket per step, one global batch per step, exact resumable state.

Reads the records of :mod:`contentv_jax.data.encode` (``index.json`` + ArrayRecord files per bucket)::

    batches = TrainBatches(records_dir, seed=0, video_batch_size=8, image_batch_size=16,
                           batch_multiple=mesh_batch_size, host_rows=rows_of_this_host)
    for batch in batches:          # or next(batches)
        batch["latents"]           # float32 (b, T', h, w, C) normalised latents: this host's rows
        batch["prompt_embeds"]     # float32 (b, 77 + L, Dctx)
        batch["pooled"]            # float32 (b, Dpool)
        batch["bucket"]            # str key, e.g. "f9_h48_w80"; batch["step"]: int
        batch["global_batch_size"] # int B: the rows of the step's global batch (b of them are here)
    state = batches.get_state()    # JSON-able dict: save it with the checkpoint (orbax JsonSave)
    batches.set_state(state)       # resume: the next batch is exactly the one that would have come

How a step's batch is chosen (a pure function of ``(seed, step)`` and the index: identical on every
host, for any number of hosts, and after any restart):

1. bucket: :func:`contentv_jax.data.buckets.bucket_for_step(seed, step, available, weights)`;
   weights are the buckets' record counts (``bucket_weights="records"``), uniform, an explicit
   mapping, or, with ``image_fraction``, image buckets share ``image_fraction`` of the draws;
2. records: the bucket's records are visited in a fresh permutation per epoch
   (``numpy.random.default_rng([seed, crc32(key), epoch])``); the step's global batch takes the next
   ``B`` positions of that stream, where the position is the number of earlier steps that drew the
   bucket times ``B``;
3. batch sizes: the global batch ``B`` of each bucket is :func:`contentv_jax.data.buckets.make_buckets`'s
   (tokens per batch kept about constant; ``video_batch_size`` at the stage's largest video shape);
4. hosts: each host loads only its rows ``host_rows(B)`` of the global batch (by default the
   ``process_index``-th of ``process_count`` equal contiguous blocks; the trainer passes the rows its
   devices hold under the mesh, :func:`contentv_jax.sharding.distributed.local_batch_slice`), so the
   hosts' rows together are exactly the single-host batch, and no row is loaded by two hosts unless the
   mesh replicates the batch across them.

The steps form a ``grain.MapDataset`` (random access by step), iterated with
``to_iter_dataset(grain.ReadOptions(num_threads, prefetch_buffer_size))``: grain prefetches in threads
and its iterator state (``next_index`` = the next step) is what :meth:`TrainBatches.get_state` saves,
with a fingerprint (seed, record counts, batch sizes, weights) that :meth:`set_state` checks. The state
does not depend on the host layout: a checkpoint resumes on another number of hosts.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from contentv_jax.data.encode import decode_record, load_null_text, read_index
from contentv_jax.data.buckets import Bucket, draw_index, make_buckets

__all__ = ["TrainBatches", "StepPlanner"]

_NUM_STEPS = 2**40  # the step dataset is "infinite": random access, never materialised
_PREFIX_EVERY = 1024


class StepPlanner:
    """``plan(step) -> (bucket key, record indices of the step's global batch)``, a pure function of the step.

    The plan does not depend on the host layout (hosts take their rows of it). Keeps prefix counts of
    bucket draws every 1024 steps so that ``plan`` at step ``s`` costs at most 1024 draws after the
    first call (thread-safe).

    Args:
      num_records: records per bucket key.
      batch_size: global batch per bucket key.
      seed: the shared data seed.
      weights: draw weight per bucket key; buckets with no record or zero weight are never drawn.
    Raises:
      ValueError: when no bucket has a record and a non-zero weight.
    """

    def __init__(
        self,
        num_records: Mapping[str, int],
        batch_size: Mapping[str, int],
        *,
        seed: int,
        weights: Mapping[str, float],
    ):
        self.seed = seed
        self.num_records = {k: int(n) for k, n in num_records.items()}
        self.available = sorted(k for k, n in self.num_records.items() if n > 0 and weights.get(k, 0) > 0)
        if not self.available:
            raise ValueError(
                f"no bucket has a record and a non-zero weight "
                f"(records per bucket: {dict(num_records)}, weights: {dict(weights)})"
            )
        self.weights = {k: float(weights[k]) for k in self.available}
        p = np.array([self.weights[k] for k in self.available])
        self._cdf = np.cumsum(p / p.sum())  # bucket_for_step's distribution, computed once
        self.batch_size = dict(batch_size)
        self._prefix: list[dict[str, int]] = [dict.fromkeys(self.available, 0)]  # counts before step i*1024
        self._lock = threading.Lock()
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def bucket(self, step: int) -> str:
        """``bucket_for_step(seed, step, available, weights)`` (same draw, distribution precomputed)."""
        return self.available[draw_index(self.seed, step, self._cdf)]

    def draws_before(self, step: int) -> dict[str, int]:
        """How many steps ``< step`` drew each bucket."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        block = step // _PREFIX_EVERY
        with self._lock:
            while len(self._prefix) <= block:
                counts = dict(self._prefix[-1])
                start = (len(self._prefix) - 1) * _PREFIX_EVERY
                for s in range(start, start + _PREFIX_EVERY):
                    counts[self.bucket(s)] += 1
                self._prefix.append(counts)
            counts = dict(self._prefix[block])
        for s in range(block * _PREFIX_EVERY, step):
            counts[self.bucket(s)] += 1
        return counts

    def _perm(self, key: str, epoch: int) -> np.ndarray:
        with self._lock:
            p = self._perms.get((key, epoch))
            if p is None:
                rng = np.random.default_rng([self.seed, zlib.crc32(key.encode()), epoch])
                p = rng.permutation(self.num_records[key])
                if len(self._perms) > 64:
                    self._perms.clear()
                self._perms[(key, epoch)] = p
            return p

    def plan(self, step: int) -> tuple[str, list[int]]:
        key = self.bucket(step)
        b = self.batch_size[key]
        n = self.num_records[key]
        start = self.draws_before(step)[key] * b
        return key, [int(self._perm(key, pos // n)[pos % n]) for pos in range(start, start + b)]


class TrainBatches:
    """Bucketed, resumable batches of encoded records, each host loading its rows (see the module docstring).

    Args:
      records_dir: an output directory of :func:`contentv_jax.data.encode.encode_dataset`.
      seed: the shared data seed (bucket draws and record order).
      video_batch_size / image_batch_size: global batch at the stage's largest video / image bucket
        (``image_batch_size`` defaults to ``video_batch_size``); smaller buckets get larger batches.
      batch_multiple: every global batch is a multiple of it (the mesh's batch-sharding size); must
        be a multiple of ``process_count``.
      process_index / process_count: this host and the host count (default ``jax.process_index()``
        / ``jax.process_count()``).
      host_rows: ``host_rows(B) -> slice``: the rows ``[start, stop)`` of a global batch of ``B`` rows
        that this host loads (e.g. ``lambda B: local_batch_slice(B, mesh, spec)``); default: the
        ``process_index``-th of ``process_count`` equal contiguous blocks.
      bucket_weights: ``"records"`` (default), ``"uniform"`` or a mapping key -> weight.
      image_fraction: when set, image buckets get this share of the draws, video buckets the rest.
      kinds: ``"both"``, ``"video"`` or ``"image"``: the bucket kinds to draw from.
      num_threads, prefetch: grain's read threads and prefetch buffer (batches).

    Raises FileNotFoundError for a directory without ``index.json``, ValueError for bad sizes, when no
    bucket has a record, or when ``host_rows`` gives an empty or out-of-range row block.
    """

    def __init__(
        self,
        records_dir: str | os.PathLike,
        *,
        seed: int = 0,
        video_batch_size: int = 1,
        image_batch_size: int | None = None,
        batch_multiple: int = 1,
        process_index: int | None = None,
        process_count: int | None = None,
        host_rows: Callable[[int], slice] | None = None,
        bucket_weights: str | Mapping[str, float] = "records",
        image_fraction: float | None = None,
        kinds: str = "both",
        num_threads: int = 2,
        prefetch: int = 2,
        caption_weights: Mapping[str, float] | None = None,
        record_filter: Mapping[str, Mapping[str, float]] | None = None,
    ):
        import grain

        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
        if batch_multiple % process_count:
            raise ValueError(
                f"batch_multiple {batch_multiple} must be a multiple of process_count {process_count} "
                "(by default each host loads global_batch / process_count rows)"
            )
        if kinds not in ("both", "video", "image"):
            raise ValueError(f"kinds must be 'both', 'video' or 'image', got {kinds!r}")
        self.records_dir = Path(records_dir)
        self.index = read_index(self.records_dir)
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        max_frames, max_h, max_w = self.index["max_shape"]
        table = {
            b.key: b
            for b in make_buckets(
                max_frames, max_h, max_w, fps=self.index["fps"], video_batch_size=video_batch_size,
                image_batch_size=image_batch_size, images=True, videos=max_frames > 1,
                batch_multiple=batch_multiple,
            )
        }
        entries = self.index["buckets"]
        unknown = [k for k in entries if k not in table]
        if unknown:
            raise ValueError(f"{self.records_dir}: buckets {unknown} do not belong to max shape {self.index['max_shape']}")
        keep = [k for k in entries if kinds == "both" or (table[k].is_image == (kinds == "image"))]
        self.buckets: dict[str, Bucket] = {k: table[k] for k in keep}
        num_records = {k: int(entries[k]["num_records"]) for k in keep}
        self.caption_weights = dict(caption_weights or {})
        # curated subset: the records of each bucket that the filter keeps (ranks over the whole dataset)
        self.filter_report = None
        self.kept = self._apply_filter(entries, keep, num_records, record_filter or {})
        num_records = {k: len(v) for k, v in self.kept.items()}
        weights = self._weights(bucket_weights, image_fraction, num_records)
        self.planner = StepPlanner(
            num_records, {k: b.batch_size for k, b in self.buckets.items()}, seed=self.seed, weights=weights
        )
        self._host_rows = host_rows or self._even_rows
        # this host's rows of each bucket's global batch (checked once: host_rows must be a pure function)
        self.rows = {k: self._check_rows(k, self.buckets[k].batch_size) for k in self.planner.available}
        self._sources = {}
        for k in self.planner.available:
            paths = [str(self.records_dir / f) for f in entries[k]["files"]]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"record files of bucket {k} missing: {', '.join(missing)}")
            # several files (encode shards) read as one sequence, in the index's order
            self._sources[k] = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
            if len(self._sources[k]) != int(entries[k]["num_records"]):
                raise ValueError(f"{paths}: {len(self._sources[k])} records, index says {entries[k]['num_records']}")
        self.dataset = grain.MapDataset.range(0, _NUM_STEPS).map(self.batch)
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
        self._fingerprint = {
            "seed": self.seed,
            "num_records": {k: num_records[k] for k in self.planner.available},
            "batch_sizes": {k: self.buckets[k].batch_size for k in self.planner.available},
            "weights": self.planner.weights,
        }
        if record_filter:
            self._fingerprint["filter"] = {k: dict(v) for k, v in record_filter.items()}
        if self.caption_weights:
            self._fingerprint["caption_weights"] = self.caption_weights

    def _apply_filter(self, entries, keys, num_records, rules) -> dict[str, np.ndarray]:
        """Per bucket, the record positions kept by ``rules`` (``data.filter``); all when no rules."""
        if not rules:
            return {k: np.arange(num_records[k]) for k in keys}
        from contentv_jax.data.curation import filter_records

        names = sorted({f for k in keys for f in entries[k].get("fields", {})})
        columns = {f: [v for k in keys for v in entries[k].get("fields", {}).get(f, [None] * num_records[k])] for f in names}
        mask = filter_records(columns, rules)
        kept, start = {}, 0
        for k in keys:
            kept[k] = np.flatnonzero(mask[start:start + num_records[k]])
            start += num_records[k]
        total, n_kept = int(sum(num_records.values())), int(mask.sum())
        self.filter_report = (f"data.filter {dict(rules)}: kept {n_kept} of {total} records, dropped {total - n_kept}")
        if n_kept == 0:
            raise ValueError(f"{self.records_dir}: data.filter {dict(rules)} keeps none of the {total} records")
        return kept

    def _even_rows(self, global_batch_size: int) -> slice:
        local = global_batch_size // self.process_count
        return slice(self.process_index * local, (self.process_index + 1) * local)

    def _check_rows(self, key: str, global_batch_size: int) -> slice:
        rows = self._host_rows(global_batch_size)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"host_rows({global_batch_size}) must return a slice with step 1, got {rows!r}")
        start, stop = rows.start or 0, global_batch_size if rows.stop is None else rows.stop
        if not 0 <= start < stop <= global_batch_size:
            raise ValueError(
                f"host_rows({global_batch_size}) gave rows [{start}, {stop}) for bucket {key}: expected a "
                f"non-empty block within [0, {global_batch_size})"
            )
        return slice(start, stop)

    @staticmethod
    def _weights(bucket_weights, image_fraction, num_records) -> dict[str, float]:
        if isinstance(bucket_weights, Mapping):
            extra = [k for k in bucket_weights if k not in num_records]
            if extra:
                raise ValueError(f"bucket_weights names unknown buckets {extra}; known: {sorted(num_records)}")
            w = {k: float(bucket_weights.get(k, 0.0)) for k in num_records}
        elif bucket_weights == "records":
            w = {k: float(n) for k, n in num_records.items()}
        elif bucket_weights == "uniform":
            w = {k: 1.0 for k in num_records}
        else:
            raise ValueError(f"bucket_weights must be 'records', 'uniform' or a mapping, got {bucket_weights!r}")
        if image_fraction is not None:
            if not 0.0 <= image_fraction <= 1.0:
                raise ValueError(f"image_fraction must be in [0, 1], got {image_fraction}")
            img = {k for k in w if Bucket.from_key(k).is_image}
            for group, share in ((img, image_fraction), (set(w) - img, 1.0 - image_fraction)):
                tot = sum(w[k] for k in group)
                for k in group:
                    w[k] = share * w[k] / tot if tot > 0 else 0.0
        return w

    # -- random access ------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, Any]:
        """This host's rows of the batch of ``step`` (what the iterator yields at that step)."""
        from contentv_jax.data.curation import draw_caption

        key, idx = self.planner.plan(int(step))
        src, kept, rows = self._sources[key], self.kept[key], self.rows[key]
        recs = [decode_record(src[int(kept[i])]) for i in idx[rows]]
        embeds, pooled, chosen, kinds = [], [], [], []
        for row, r in zip(range(rows.start, rows.stop), recs):
            e, p = r["prompt_embeds"], r["pooled"]
            if e.ndim == 3:  # several captions: one per sample per step, from (seed, step, global row)
                ks = r["meta"].get("caption_kinds") or ["caption"] * e.shape[0]
                c = draw_caption(self.seed, int(step), row, ks, self.caption_weights)
                e, p, kind = e[c], p[c], ks[c]
            else:
                c, kind = 0, "caption"
            embeds.append(e)
            pooled.append(p)
            chosen.append(c)
            kinds.append(kind)
        return {
            "latents": np.stack([r["latents"] for r in recs]),
            "prompt_embeds": np.stack(embeds),
            "pooled": np.stack(pooled),
            "caption_index": np.asarray(chosen, np.int32),
            "caption_kind": kinds,
            "bucket": key,
            "step": int(step),
            "global_batch_size": len(idx),
        }

    def summary(self) -> str:
        """One line per bucket: records, global batch, this host's rows of it, draw probability."""
        p = self.planner
        tot = sum(p.weights.values())
        lines = [f"data {self.records_dir}: {len(p.available)} buckets, host {self.process_index}/{self.process_count}"]
        if self.filter_report:
            lines.append("  " + self.filter_report)
        for k in p.available:
            r = self.rows[k]
            lines.append(
                f"  {k}: {p.num_records[k]} records, batch {self.buckets[k].batch_size} "
                f"(this host rows {r.start}:{r.stop}), p={p.weights[k] / tot:.3f}"
            )
        return "\n".join(lines)

    def null_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's ``(prompt_embeds (1, L, Dctx), pooled (1, Dpool))`` for caption dropout."""
        return load_null_text(self.records_dir)

    # -- iteration and state ------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iter)

    @property
    def step(self) -> int:
        """The step of the next batch."""
        return int(self._iter.get_state()["next_index"])

    def get_state(self) -> dict[str, Any]:
        """JSON-able iterator state: grain's ``next_index`` (the next step) plus a fingerprint."""
        return {"version": 1, "grain": dict(self._iter.get_state()), **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`'s dict; the next batch is the one that followed it.

        Raises ValueError when the state was made with another seed, record counts, batch sizes or
        weights (the data order would differ). The host layout may differ.
        """
        if state.get("version") != 1:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected 1")
        for k, v in self._fingerprint.items():
            if _jsonish(state.get(k)) != _jsonish(v):
                raise ValueError(f"data iterator state does not match this pipeline: {k} was {state.get(k)!r}, now {v!r}")
        self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
        self._iter.set_state(dict(state["grain"]))

    def seek(self, step: int) -> None:
        """Continue from ``step`` (the batch of ``step`` comes next)."""
        self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
        self._iter.set_state({"next_index": int(step)})


def _jsonish(x):
    import json

    return json.loads(json.dumps(x, sort_keys=True))
