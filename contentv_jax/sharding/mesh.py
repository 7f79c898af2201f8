"""The device mesh, with axes (data, fsdp, sequence), built from config.

``data`` replicates parameters (HYBRID_SHARD groups), ``fsdp`` shards them, ``sequence`` splits video
tokens for Ulysses attention. A size of -1 fills the remaining devices (at most one axis may be -1).

Across slices (TPU multislice) or hosts joined by a slower network, ``dcn_data`` / ``dcn_fsdp`` /
``dcn_sequence`` say how many of each axis's groups span that network: the mesh is then laid out with
``mesh_utils.create_hybrid_device_mesh`` so that the fast within-slice links carry the rest. The usual
choice (MaxText's, and the ContentV report's HYBRID_SHARD) is ``dcn_data = number of slices``: only the
data-parallel gradient all-reduce crosses slices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from contentv_jax.sharding.logical import rules_from_config

AXES = ("data", "fsdp", "sequence")


def _fill(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
    named = dict(zip(AXES, sizes))
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: at most one {what} axis may be -1, got {named}")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh: {what} axis sizes must be >= 1 or -1, got {named}")
    if fills:
        known = math.prod(s for s in sizes if s != -1)
        if total % known:
            raise ValueError(f"mesh: {total} {what} devices are not divisible by {named}")
        sizes[fills[0]] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"mesh: {what} sizes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)}, but there are {total} {what} devices"
        )
    return tuple(sizes)


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; ``-1`` fills the rest. Overridable as ``mesh.data=2`` etc.

    ``data``, ``fsdp``, ``sequence`` are the total axis sizes. ``dcn_*`` (default 1) are the parts of
    each that span slices/hosts over the data-center network; each must divide its total.
    ``rules``: the logical-axis rules, ``[[logical name, mesh axis | [mesh axes] | null], ...]``
    (e.g. ``[[activation_batch, [data, fsdp]], [activation_video_tokens, sequence], [embed, fsdp]]``);
    empty: ``contentv_jax.sharding.logical.DEFAULT_RULES``.
    """

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    rules: list = dataclasses.field(default_factory=list)

    def logical_rules(self):
        """``rules`` as a ``LogicalRules`` table (``DEFAULT_RULES`` when empty).

        Raises:
          ValueError: a malformed rule, or a mesh axis other than data / fsdp / sequence.
        """
        return rules_from_config(self.rules, AXES)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Total axis sizes for ``num_devices`` devices.

        Raises:
          ValueError: more than one -1, a size < 1, or sizes that do not multiply to ``num_devices``.
        """
        return _fill([self.data, self.fsdp, self.sequence], num_devices, "")

    def resolve_hybrid(self, num_devices: int, num_slices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(within-slice sizes, across-slice sizes) for ``num_devices`` devices in ``num_slices`` equal slices.

        ``-1`` in a ``dcn_*`` field fills ``num_slices``.

        Raises:
          ValueError: sizes that do not multiply out, a ``dcn_*`` that does not divide its total, or
            ``num_devices`` not divisible by ``num_slices``.
        """
        if num_slices < 1 or num_devices % num_slices:
            raise ValueError(f"mesh: {num_devices} devices do not split into {num_slices} equal slices")
        total = self.resolve(num_devices)
        dcn = _fill([self.dcn_data, self.dcn_fsdp, self.dcn_sequence], num_slices, "across-slice")
        for name, t, d in zip(AXES, total, dcn):
            if t % d:
                raise ValueError(f"mesh: dcn_{name}={d} does not divide {name}={t}")
        return tuple(t // d for t, d in zip(total, dcn)), dcn


def _by_slice(devices) -> bool:
    """TPU devices group by ``slice_index``; others (CPU, GPU) by process (host)."""
    return all(d.platform == "tpu" and getattr(d, "slice_index", None) is not None for d in devices)


def _num_slices(devices) -> int:
    if _by_slice(devices):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def create_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'fsdp', 'sequence')`` (Auto axis types, GSPMD-style).

    Args:
      cfg: axis sizes (default: everything on ``fsdp``).
      devices: the devices to lay out (default ``jax.devices()``, all processes').
    Returns:
      the mesh; with any ``dcn_*`` > 1, a hybrid (within-slice x across-slice) device layout in which
      the devices of one slice (or one process, off TPU) are contiguous along each axis's inner part.
    Raises:
      ValueError: see :meth:`MeshConfig.resolve` / :meth:`MeshConfig.resolve_hybrid`.
    """
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    if (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_sequence) == (1, 1, 1):
        shape = cfg.resolve(len(devices))
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    num_slices = _num_slices(devices)
    ici, dcn = cfg.resolve_hybrid(len(devices), num_slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not _by_slice(devices))
    return Mesh(np.asarray(grid), AXES, axis_types=(AxisType.Auto,) * 3)
