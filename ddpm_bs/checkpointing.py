"""Checkpoints: orbax `CheckpointManager` over the train state and the data position.

Orbax writes each step into a temporary directory and renames it when complete, and
deletes old steps (beyond `keep`) only after a newer one is finalised, so the last good
checkpoint is never lost to a failed save. Steps live at `<workdir>/checkpoints/<step>`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves and restores `{'state': TrainState, 'data': {'step': int}}` in a workdir."""

    def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
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
        """Restores into `abstract_state`'s structure, shapes and shardings.

        Raises:
          ValueError: naming the checkpoint when its arrays do not fit the configured model.
        """
        step = self.latest_step() if step is None else step
        check_compatible(self.manager.item_metadata(step)["state"], abstract_state, self.directory)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return restored["state"], dict(restored["data"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


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
