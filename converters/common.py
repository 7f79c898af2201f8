"""diffusers-format checkpoint I/O shared by the component converters: safetensors reading and writing.

diffusers format (what ``ModelMixin.save_pretrained`` writes and ``from_pretrained`` reads):
``config.json`` plus ``<weights_name>.safetensors``, or shards ``<weights_name>-0000i-of-0000n.safetensors``
with ``<weights_name>.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).

Our own format (Orbax + ``config.json``) is ``contentv_jax.checkpoints``'s alone.

Every write goes to a temporary sibling directory which is then renamed onto the destination, so a
failure never leaves a half-written destination behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from contentv_jax.atomic import commit_dir, tmp_sibling
from safetensors import safe_open

CONFIG_NAME = "config.json"

# safetensors dtype string <-> numpy dtype (bfloat16 and float8 through ml_dtypes).
_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

# Floating dtypes our models accept as parameters.
SUPPORTED_PARAM_DTYPES = ("F32", "BF16", "F16")


class CheckpointError(ValueError):
    """A checkpoint does not match what was expected.

    The message names every offending tensor (missing, unexpected, mis-shaped, unsupported dtype)
    with the expected and the found shape or dtype.
    """


class LazyTensor:
    """One tensor of a safetensors file, read only on :meth:`load`.

    Attributes:
      name: the tensor's key in the file.
      shape: tuple of ints, from the header (no data read).
      st_dtype: the safetensors dtype string ('F32', 'BF16', ...).
      dtype: the numpy dtype (``ml_dtypes.bfloat16`` for 'BF16'), or ``None`` if numpy has none.
      file: the ``.safetensors`` path holding it.
    """

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], st_dtype: str, offsets: tuple[int, int], data_start: int):
        self.file = Path(file)
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.st_dtype = st_dtype
        self.dtype = _ST_TO_NP.get(st_dtype)
        self._offsets = offsets
        self._data_start = data_start

    def load(self) -> np.ndarray:
        """Read the tensor's bytes and return them as a numpy array (byte-identical to the file).

        Raises:
          CheckpointError: if numpy has no dtype for the tensor or its byte size disagrees with its shape.
        """
        if self.dtype is None:
            raise CheckpointError(f"{self.name}: unsupported dtype {self.st_dtype} in {self.file}")
        begin, end = self._offsets
        nbytes = end - begin
        expected = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if nbytes != expected:
            raise CheckpointError(
                f"{self.name}: {nbytes} bytes in {self.file} but shape {self.shape} {self.st_dtype} needs {expected}"
            )
        with open(self.file, "rb") as f:
            f.seek(self._data_start + begin)
            raw = f.read(nbytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape).copy()

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.st_dtype})"


def _read_safetensors_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    return header, 8 + n


def _open_safetensors(file: Path) -> dict[str, LazyTensor]:
    """Index one ``.safetensors`` file: ``safe_open`` validates it and gives names, shapes, dtypes."""
    header, data_start = _read_safetensors_header(file)
    out = {}
    with safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = LazyTensor(
                file, name, tuple(sl.get_shape()), sl.get_dtype(), tuple(header[name]["data_offsets"]), data_start
            )
    return out


def is_diffusers_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory with ``config.json`` and safetensors weights (single or indexed)."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONFIG_NAME).is_file()
        and (any(p.glob("*.safetensors.index.json")) or any(p.glob("*.safetensors")))
    )


def open_diffusers_dir(path: str | os.PathLike) -> tuple[dict, Mapping[str, LazyTensor]]:
    """Open a diffusers-format model directory lazily.

    Reads ``config.json`` and either the ``*.safetensors.index.json`` (shards) or the single
    ``*.safetensors`` file; no tensor data is read until ``LazyTensor.load()``.

    Returns:
      (config dict, {tensor name: LazyTensor}).
    Raises:
      CheckpointError: no config / no weights / several candidate weight files / a shard missing /
        a tensor listed in the index but absent from its shard.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory")
    cfg_file = p / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: no {CONFIG_NAME}")
    config = json.loads(cfg_file.read_text())
    indexes = sorted(p.glob("*.safetensors.index.json"))
    tensors: dict[str, LazyTensor] = {}
    if indexes:
        if len(indexes) > 1:
            raise CheckpointError(f"{p}: several safetensors indexes {[i.name for i in indexes]}; expected one")
        index = json.loads(indexes[0].read_text())
        weight_map: dict[str, str] = index.get("weight_map", {})
        problems = []
        for shard in sorted(set(weight_map.values())):
            if not (p / shard).is_file():
                problems.append(f"shard {shard} listed in {indexes[0].name} is missing")
                continue
            found = _open_safetensors(p / shard)
            for name, t in found.items():
                if weight_map.get(name) == shard:
                    tensors[name] = t
                else:
                    problems.append(f"{name}: in {shard} but the index maps it to {weight_map.get(name)}")
        for name, shard in weight_map.items():
            if name not in tensors and (p / shard).is_file():
                problems.append(f"{name}: listed in the index for {shard} but absent from it")
        if problems:
            raise CheckpointError(f"{p}: inconsistent sharded checkpoint:\n  " + "\n  ".join(problems))
    else:
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: no *.safetensors file and no *.safetensors.index.json")
        if len(files) > 1:
            raise CheckpointError(f"{p}: several safetensors files {[f.name for f in files]} and no index")
        tensors = _open_safetensors(files[0])
    return config, tensors


def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ("," if len(s) == 1 else "") + ")"


def check_tensors(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, what: str) -> None:
    """Compare tensor names and shapes.

    Args:
      expected: {name: shape} the model needs.
      found: {name: shape} the checkpoint has.
      what: a description for the message (e.g. the checkpoint path).
    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped tensor with expected vs found shape.
    """
    problems = []
    for name in sorted(expected):
        if name not in found:
            problems.append(f"missing tensor {name}: expected shape {_fmt_shape(expected[name])}, found none")
        elif tuple(found[name]) != tuple(expected[name]):
            problems.append(
                f"mis-shaped tensor {name}: expected shape {_fmt_shape(expected[name])}, found {_fmt_shape(found[name])}"
            )
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name}: expected none, found shape {_fmt_shape(found[name])}")
    if problems:
        raise CheckpointError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def check_dtypes(found: Mapping[str, str], *, what: str, supported: tuple[str, ...] = SUPPORTED_PARAM_DTYPES) -> None:
    """Raise :class:`CheckpointError` naming every tensor whose safetensors dtype is not in ``supported``.

    Args:
      found: {name: safetensors dtype string}.
    """
    bad = [f"unsupported dtype for tensor {n}: expected one of {supported}, found {d}" for n, d in sorted(found.items()) if d not in supported]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} problem(s):\n  " + "\n  ".join(bad))


def _safetensors_bytes(tensors: Mapping[str, np.ndarray]) -> tuple[bytes, list[tuple[str, np.ndarray]]]:
    """Build a safetensors header (names sorted, data in that order, 8-byte aligned header)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    items = []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        st = _NP_TO_ST.get(arr.dtype)
        if st is None:
            raise CheckpointError(f"{name}: cannot write dtype {arr.dtype} to safetensors")
        n = arr.nbytes
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
        items.append((name, arr))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob, items


def _write_safetensors(file: Path, tensors: Mapping[str, np.ndarray]) -> None:
    head, items = _safetensors_bytes(tensors)
    with open(file, "wb") as f:
        f.write(head)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())


def write_diffusers_dir(
    dst: str | os.PathLike,
    config: dict,
    tensors: Mapping[str, np.ndarray],
    *,
    weights_name: str = "diffusion_pytorch_model",
    max_shard_size: int = 10 * 2**30,
) -> None:
    """Write a diffusers-format directory atomically.

    Writes ``config.json`` and ``<weights_name>.safetensors``; when the tensors total more than
    ``max_shard_size`` bytes, writes shards ``<weights_name>-0000i-of-0000n.safetensors`` (greedy, in
    name order, as diffusers does) plus ``<weights_name>.safetensors.index.json``. Tensor bytes are
    written as given (numpy arrays, ``ml_dtypes.bfloat16`` for bf16).

    Raises:
      CheckpointError: a dtype safetensors cannot hold. ``dst`` is untouched on any error.
    """
    dst = Path(dst)
    tmp = tmp_sibling(dst)
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        names = sorted(tensors)
        total = sum(np.asarray(tensors[n]).nbytes for n in names)
        if total <= max_shard_size:
            _write_safetensors(tmp / f"{weights_name}.safetensors", tensors)
        else:
            shards: list[list[str]] = [[]]
            size = 0
            for n in names:
                nb = np.asarray(tensors[n]).nbytes
                if shards[-1] and size + nb > max_shard_size:
                    shards.append([])
                    size = 0
                shards[-1].append(n)
                size += nb
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, {n: tensors[n] for n in shard})
                weight_map.update({n: fname for n in shard})
            index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
            (tmp / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
