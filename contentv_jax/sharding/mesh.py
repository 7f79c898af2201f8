"""The device mesh, with axes (data, fsdp, sequence), built from config.

``data`` replicates parameters (HYBRID_SHARD groups), ``fsdp`` shards them, ``sequence`` splits video
tokens for Ulysses attention. A size of -1 fills the remaining devices (at most one axis may be -1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "sequence")


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; ``-1`` fills the rest. Overridable as ``mesh.data=2`` etc."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes for ``num_devices`` devices.

        Raises:
          ValueError: more than one -1, a size < 1, or sizes that do not multiply to ``num_devices``.
        """
        sizes = [self.data, self.fsdp, self.sequence]
        fills = [i for i, s in enumerate(sizes) if s == -1]
        if len(fills) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
        if any(s < 1 and s != -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be >= 1 or -1, got {dict(zip(AXES, sizes))}")
        if fills:
            known = math.prod(s for s in sizes if s != -1)
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices are not divisible by {dict(zip(AXES, sizes))}")
            sizes[fills[0]] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh: sizes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)}, but there are {num_devices} devices"
            )
        return tuple(sizes)


def create_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'fsdp', 'sequence')`` (Auto axis types, GSPMD-style)."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
