"""Training checkpoints with Orbax's CheckpointManager: parameters, optimizer, EMA, step, RNG, data position.

Layout under ``<run_dir>/checkpoints/<step>/``: item ``state`` (the train-state pytree, its leaves saved
under index keys so any nesting round-trips; restored into the current run's structure and shardings),
item ``data`` (the data iterator's state as JSON) and item ``paths`` (JSON ``{"paths": [[key, ...], ...]}``:
each leaf's key path, so the weights alone can be read back, e.g. to sample an intermediate step:
``contentv_jax.runs.load_checkpoint_transformer``). Saves are asynchronous (``async_save``); Orbax
commits a step atomically (a temporary directory renamed on completion), so a killed run resumes from
the last committed step. Orbax coordinates hosts itself (the primary host writes metadata).

Integrity: once every host has written its files and before Orbax renames the temporary step
directory, the primary host writes ``manifest.json`` (size and sha256 of every file,
``contentv_jax.checkpoints.write_manifest``) into it; :meth:`TrainCheckpointer.restore` verifies it
by default, naming a missing, truncated or damaged file (``verify=False`` skips the check).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from contentv_jax.checkpoints import save_handler, verify_manifest, write_manifest

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary step directory: <step> + this, renamed on commit


def _leaves_dict(tree) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree.flatten(tree)
    return {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}, treedef


def leaf_paths(tree) -> list[list[str]]:
    """Each leaf's key path in ``tree`` (dict keys, sequence indices, attribute names as strings), in leaf order."""
    def name(k) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return [[name(k) for k in path] for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _encode_data_state(state) -> dict:
    if isinstance(state, (bytes, bytearray)):
        return {"bytes_b64": base64.b64encode(bytes(state)).decode()}
    return {"json": state}


def _decode_data_state(blob: dict):
    if "bytes_b64" in blob:
        return base64.b64decode(blob["bytes_b64"])
    return blob["json"]


class TrainCheckpointer:
    """Saves every ``every`` steps, keeps the last ``keep``; ``async_save`` overlaps writes with training."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        self._async = async_save
        self._saving: int | None = None
        # always Orbax's asynchronous path (its post-finalization hook runs on the primary host after
        # every host's writes and before the commit rename); async_save=False then waits after each save
        # saves on the interval (and at JAX's preemption sync point), not also at the first step as
        # Orbax's default policy does: the checkpoints of a run are exactly steps k * every
        from orbax.checkpoint import checkpoint_managers as policies

        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
            ),
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest),
            create=True,
        )
        handlers = {"state": save_handler(), "data": ocp.JsonCheckpointHandler(), "paths": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def on_interval(self, step: int) -> bool:
        """Whether ``step`` is one of the interval's checkpoints (``step % every == 0``); preemption saves aside."""
        return step % self.every == 0

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state, *, force: bool = False) -> bool:
        """Start saving ``state`` (a pytree of jax arrays) and ``data_state`` (JSON-able or bytes) at ``step``.

        Returns whether a save was started (``force`` saves off the interval, e.g. at the end or on SIGTERM).
        """
        leaves, _ = _leaves_dict(state)
        if not (force or self._manager.should_save(step)):
            return False
        self._manager.wait_until_finished()  # one save in flight: the manifest hook knows its step
        self._saving = step
        started = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(leaves), data=ocp.args.JsonSave(_encode_data_state(data_state)),
                paths=ocp.args.JsonSave({"paths": leaf_paths(state)}),
            ),
            force=force,
        )
        if started and not self._async:
            self._manager.wait_until_finished()
        return started

    def _write_manifest(self) -> None:
        """Orbax's post-finalization hook (primary host, all hosts' files written, not yet renamed)."""
        if self._saving is None:
            return
        tmp = self.directory / f"{self._saving}{_TMP_SUFFIX}"
        if tmp.is_dir():
            write_manifest(tmp)

    def restore(self, step: int, template, *, verify: bool = True):
        """Restore ``step`` into the structure, dtypes and shardings of ``template`` (a pytree of arrays).

        Returns ``(state, data_state)``. Raises CheckpointError (``verify``: a file missing, truncated
        or damaged, named) and ValueError when the saved leaves do not match the template's.
        """
        if verify:
            verify_manifest(self.directory / str(step))
        abstract, treedef = _leaves_dict(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
        )
        state_args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
        leaves = restored["state"]
        if set(leaves) != set(abstract):
            raise ValueError(
                f"checkpoint {self.directory / str(step)} holds {len(leaves)} arrays, the run's state has {len(abstract)}"
            )
        state = jax.tree.unflatten(treedef, [leaves[k] for k in sorted(abstract)])
        return state, _decode_data_state(restored["data"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
