"""Checkpoints: orbax `CheckpointManager` over the train state and the data position.

Orbax writes each step into a temporary directory and renames it when complete, and
deletes old steps (beyond `keep`) only after a newer one is finalised, so the last good
checkpoint is never lost to a failed save. Steps live at `<workdir>/checkpoints/<step>`.

A process killed during a write leaves only a temporary directory, which the next start
removes. A finalised step that cannot be read back (a truncated or damaged file) is reported,
moved to `<workdir>/checkpoints_unreadable/<step>` (kept for inspection, never deleted), and
the step before it is restored instead.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ddpm_bs import artifacts


class Checkpoints:
    """Saves and restores `{'state': TrainState, 'data': {'step': int}}` in a workdir."""

    def __init__(
        self, workdir: str, *, keep: int = 3, keep_period: int = 0, asynchronous: bool = True
    ):
        """Args:
        workdir: the run directory (local or gs://…); steps go to `<workdir>/checkpoints`.
        keep: the newest steps kept (`train.keep_checkpoints`).
        keep_period: every step that is a multiple of it is kept too, forever
          (`train.keep_period`, for FID-vs-iterations curves); 0 keeps none beyond `keep`.
        asynchronous: whether `save` returns before the write ends.
        """
        if keep_period < 0:
            raise ValueError(
                f"train.keep_period={keep_period}: must be ≥ 0 (0 keeps only the newest "
                "train.keep_checkpoints steps)."
            )
        root = workdir if artifacts.is_remote(workdir) else os.path.abspath(workdir)
        self.directory = os.path.join(root, "checkpoints")
        self.unreadable_directory = os.path.join(root, "checkpoints_unreadable")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                keep_period=keep_period or None,
                create=True,
                enable_async_checkpointing=asynchronous,
                cleanup_tmp_directories=True,  # the remains of a write that was killed
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, int], *, force: bool = False):
        """Starts an (asynchronous) save of `state` and the data position at `step`."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, int]]:
        """Restores the newest readable step into `abstract_state`'s structure and shardings.

        An unreadable step is moved aside and the one before it tried. With `step`, that step
        only is restored, and an error reading it is raised (nothing is moved).

        Raises:
          ValueError: naming the checkpoint when its arrays do not fit the configured model.
          FileNotFoundError: when no step can be read, or `step` is not there.
        """
        if step is not None:
            if step not in self.manager.all_steps():
                raise FileNotFoundError(f"{self.directory} has no checkpoint step {step}.")
            check_compatible(
                self.manager.item_metadata(step)["state"], abstract_state, self.directory
            )
            return self._read(step, abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            restored, error = None, None
            try:
                metadata = self.manager.item_metadata(step)["state"]
            except Exception as e:  # orbax/tensorstore raise many types for a damaged file
                error = e
            if error is None:
                check_compatible(metadata, abstract_state, self.directory)  # not a damage
                try:
                    restored = self._read(step, abstract_state)
                except Exception as e:
                    error = e
            if _all_processes(error is None):
                logging.info("Restored checkpoint step %d from %s", step, self.directory)
                return restored
            self._set_aside(step, error)
        raise FileNotFoundError(f"{self.directory} holds no readable checkpoint.")

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, int]]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"])

    def _set_aside(self, step: int, error: Exception | None) -> None:
        target = os.path.join(self.unreadable_directory, f"{step}-{int(time.time())}")
        logging.warning(
            "Checkpoint step %d in %s cannot be read (%s); moved it to %s and trying the step "
            "before it.",
            step,
            self.directory,
            f"{type(error).__name__}: {error}" if error else "unreadable on another process",
            target,
        )
        if jax.process_index() == 0:
            epath.Path(self.unreadable_directory).mkdir(parents=True, exist_ok=True)
            epath.Path(self.directory, str(step)).rename(epath.Path(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ddpm_bs_set_aside_{step}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (a damaged shard may be read by one process only)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def check_compatible(saved_metadata: Any, abstract_state: Any, directory: str) -> None:
    """Raises a ValueError naming the first array whose saved shape differs from the config's."""
    saved = _shapes_by_path(saved_metadata)
    wanted = _shapes_by_path(abstract_state)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    mismatched = [(p, saved[p], wanted[p]) for p in wanted if p in saved and saved[p] != wanted[p]]
    if not (missing or extra or mismatched):
        return
    if mismatched:
        path, have, want = mismatched[0]
        detail = f"{path} is {have} in the checkpoint but {want} for this config"
    elif missing:
        detail = f"{missing[0]} is missing from the checkpoint"
    else:
        detail = f"the checkpoint has {extra[0]}, which this config's model does not"
    raise ValueError(
        f"The checkpoint in {directory} was written for another model or optimiser ({detail}; "
        f"{len(mismatched) + len(missing) + len(extra)} arrays differ). Use a new --workdir, or the "
        "config that trained this checkpoint. Nothing in the workdir was changed."
    )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            shape = np.shape(leaf)
        out["/".join(_key_name(k) for k in path)] = tuple(shape)
    return out


def _key_name(key) -> str:
    """One path element as plain text, so tuples, lists and dicts of saved metadata compare equal."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
