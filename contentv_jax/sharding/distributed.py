"""Multi-host setup: ``jax.distributed.initialize`` from flags or the environment, and global batches.

Every process runs the same program on its own devices; the mesh spans all processes' devices
(``jax.devices()``). Each process loads only its own rows of the global batch
(:func:`local_batch_slice`) and :func:`global_batch` assembles them into one global ``jax.Array``
with the layout every process agrees on. Only the main process (:func:`is_main_process`) should
write logs and checkpoint metadata.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_COORDINATOR = "CONTENTV_COORDINATOR"
ENV_NUM_PROCESSES = "CONTENTV_NUM_PROCESSES"
ENV_PROCESS_ID = "CONTENTV_PROCESS_ID"

_initialized = False


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator HOST:PORT --num-processes N --process-id I`` to ``parser`` (defaults: environment)."""
    g = parser.add_argument_group("multi-host")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator service (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"total number of processes (env {ENV_NUM_PROCESSES}); 1 or unset: single process")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's index in [0, N) (env {ENV_PROCESS_ID})")
    return parser


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def detected_cluster() -> str | None:
    """The multi-process launcher this process runs under, from its environment, or None.

    ``None`` on a plain machine (a laptop, a CI runner, one GPU box): there ``initialize`` stays
    single-process instead of calling ``jax.distributed.initialize()``, whose auto-detection would fail
    (or probe a metadata server) there. Detected, as JAX's own cluster plugins read them:

    - ``slurm``: an ``srun`` step with more than one task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
      ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``, ``SLURM_LOCALID``);
    - ``open-mpi``: ``mpirun`` (``OMPI_MCA_orte_hnp_uri``), more than one rank when ``OMPI_COMM_WORLD_SIZE`` says;
    - ``tpu``: a TPU slice (GKE: ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` listing more than one
      host, or a Megascale coordinator; Cloud TPU VMs: a TPU device node ``/dev/accel*`` or ``/dev/vfio/<n>``
      with ``libtpu`` installed, where JAX reads the slice's hosts from the TPU metadata).
    """
    env = os.environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        if (_env_int("SLURM_NTASKS") or 1) > 1:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE") or 2) > 1:
        return "open-mpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    import glob
    from importlib.util import find_spec

    if (glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")) and find_spec("libtpu") is not None:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join the multi-process JAX runtime; call before anything touches a JAX device.

    Arguments left ``None`` come from ``CONTENTV_COORDINATOR`` / ``CONTENTV_NUM_PROCESSES`` /
    ``CONTENTV_PROCESS_ID``, so the variables alone (no flags) make a multi-process job. When none of
    the three is given at all, a launcher found by :func:`detected_cluster` (TPU slice, SLURM, Open MPI)
    starts ``jax.distributed.initialize()`` with JAX's own auto-detection; on a plain machine nothing
    happens (one process). ``num_processes`` 1 always means one process. Cross-process CPU collectives
    use gloo (the setting only affects the CPU backend). JAX's preemption service (a SIGTERM on any
    host is seen by every host at one step: ``multihost_utils.reached_preemption_sync_point``) comes
    with the distributed runtime.

    Returns:
      True if the distributed runtime was initialised (now or by an earlier call), False for a single process.
    Raises:
      ValueError: ``num_processes`` > 1 without a coordinator or process id, a process id outside
        ``[0, num_processes)``, a coordinator not of the form ``HOST:PORT``, or a non-integer variable.
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        cluster = detected_cluster()
        if cluster is None:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # JAX's auto-detection: coordinator, process count and id
        _initialized = True
        return True
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process-id {process_id} needs --num-processes > 1 (env {ENV_NUM_PROCESSES})")
        return False
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if coordinator is None or process_id is None:
        raise ValueError(
            f"--num-processes {num_processes} needs --coordinator HOST:PORT and --process-id "
            f"(or env {ENV_COORDINATOR} and {ENV_PROCESS_ID})"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    _initialized = True
    return True


def initialize_from_args(args: argparse.Namespace) -> bool:
    """:func:`initialize` with the values :func:`add_distributed_args` parsed."""
    return initialize(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs and checkpoint metadata)."""
    return jax.process_index() == 0


def local_batch_slice(global_batch_size: int, mesh: Mesh, spec: PartitionSpec) -> slice:
    """The rows ``[start, stop)`` of the global batch that this process's devices hold.

    Args:
      global_batch_size: rows of the global batch (dimension 0).
      mesh, spec: the batch's layout; ``spec[0]`` names the mesh axes dimension 0 is split over.
    Raises:
      ValueError: if this process's rows are not one contiguous block (a mesh whose batch axes
        interleave processes), or ``global_batch_size`` does not divide over the batch axes.
    """
    sharding = NamedSharding(mesh, spec)
    rank = max(len(spec), 1)
    idx = sharding.addressable_devices_indices_map((global_batch_size,) + (1,) * (rank - 1))
    rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start or any(b != c for (_, b), (c, _) in zip(rows, rows[1:])):
        raise ValueError(f"this process's batch rows {rows} are not one contiguous block under {spec} on {dict(mesh.shape)}")
    return slice(start, stop)


def global_batch(local: Any, mesh: Mesh, spec: PartitionSpec, *, global_batch_size: int | None = None) -> Any:
    """Assemble per-process batch rows into global ``jax.Array``s laid out by ``spec`` on ``mesh``.

    Args:
      local: a pytree of host arrays, each holding this process's rows (:func:`local_batch_slice`) of
        the global batch along dimension 0 and the full extent of every other dimension.
      spec: the layout of dimension 0 (and others); e.g. ``P(('data', 'fsdp'))``.
      global_batch_size: rows of the global batch; default: inferred by JAX from the local rows and
        the sharding (exact for an even split over processes).
    Returns:
      the same pytree of global arrays (global dimension 0 = ``global_batch_size``).
    Raises:
      ValueError: a local array whose rows are not this process's share of ``global_batch_size``.
    """
    sharding = NamedSharding(mesh, spec)

    def one(x):
        x = np.asarray(x)
        shape = None
        if global_batch_size is not None:
            want = local_batch_slice(global_batch_size, mesh, spec)
            if x.shape[0] != want.stop - want.start:
                raise ValueError(
                    f"global_batch: this process holds rows {want.start}:{want.stop} of a global batch of "
                    f"{global_batch_size}, got a local array of {x.shape[0]} rows"
                )
            shape = (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches ``name`` (the coordination service's barrier; one process: no-op).

    Used before a program's first collective on CPU (gloo), whose set-up times out after 30 s: processes
    that compiled it at different speeds meet here first. Every process must pass the same names in order.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination-service client (what Orbax's multihost utilities use)

    _stage_calls[name] = _stage_calls.get(name, 0) + 1
    distributed.global_state.client.wait_at_barrier(f"contentv_jax/barriers/{name}/{_stage_calls[name]}",
                                                     int(timeout_s * 1000))


# How long the other processes wait for process 0's stage (the encode stage of a large dataset runs there).
STAGE_TIMEOUT_S = 24 * 3600
_stage_calls: dict[str, int] = {}


def run_on_main_then_all(name: str, fn) -> None:
    """Run ``fn`` on the main process (pass ``None`` elsewhere) while the others wait, then continue together.

    With several processes, process 0 publishes its outcome in the coordination service's key-value store
    (the one ``jax.distributed`` starts, as Orbax's barriers use it), and the others block on that key for
    up to :data:`STAGE_TIMEOUT_S`; a device collective would do for the broadcast, but on CPU (gloo) its
    first use times out after 30 s, shorter than many stages. If ``fn`` raised, it re-raises on process 0
    and every other process raises ``RuntimeError`` naming the stage ``name`` instead of waiting forever.
    Every process must call the same stages in the same order. With one process this is just ``fn()``.
    """
    if jax.process_count() == 1:
        if fn is not None:
            fn()
        return
    from jax._src import distributed  # the coordination-service client (what Orbax's multihost utilities use)

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(f"{jax.process_count()} processes without jax.distributed.initialize: no coordination "
                           f"service for the {name} stage")
    _stage_calls[name] = _stage_calls.get(name, 0) + 1
    key = f"contentv_jax/stages/{name}/{_stage_calls[name]}"
    error = None
    if fn is not None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
    if jax.process_index() == 0:
        client.key_value_set(key, "failed" if error is not None else "ok")
    elif error is None:
        error = None if client.blocking_key_value_get(key, STAGE_TIMEOUT_S * 1000) == "ok" else RuntimeError(
            f"process 0 failed in the {name} stage (see its log); stopping this process too")
    if error is not None:
        raise error
