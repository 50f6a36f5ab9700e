"""Orbax checkpoints of a run: train state, data-iterator state and config, with fallback.

Each checkpoint ``DIR/checkpoints/<step>`` holds three items: ``state`` (params, optimizer
state, step; sharded arrays), ``data`` (the grain iterator state, JSON) and ``config`` (JSON).
Orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
leaves no half checkpoint under a step name.

Restoring tries the newest checkpoint first; if it cannot be read (truncated or corrupted
files) it is *moved aside* to ``DIR/checkpoints/corrupt/<step>-<time>`` (never deleted, so it
can be inspected) and the next newest is tried.  Good checkpoints are never overwritten: a step
is only written once, and rotation keeps the ``keep`` newest.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any, Optional

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none could be restored."""


class CheckpointStore:
    def __init__(self, directory: pathlib.Path | str, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        self.keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> bool:
        """Saves ``step`` unless it already exists (a good checkpoint is never rewritten)."""
        if step in self._manager.all_steps():
            return False
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def _quarantine(self, step: int) -> pathlib.Path:
        target = self.directory / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.path(step)), str(target))
        self._manager.close()
        self._manager = self._open()
        return target

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, data_state) of the newest readable checkpoint, or ``None`` if there
        is none; unreadable ones are moved aside with a warning.  Raises
        :class:`NoUsableCheckpointError` if checkpoints existed but none could be read."""
        tried = []
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
                return step, restored["state"], dict(restored["data"])
            except Exception as e:  # any read/parse failure means this one is unusable
                moved = self._quarantine(step)
                msg = f"checkpoint step {step} is unreadable ({type(e).__name__}: {e}); moved to {moved}"
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
                tried.append(f"step {step}: {type(e).__name__}")
        if tried:
            raise NoUsableCheckpointError(
                f"no checkpoint in {self.directory} could be restored ({'; '.join(tried)}); "
                "the unreadable ones were moved to its corrupt/ folder. Remove the workdir or "
                "point --workdir elsewhere to start fresh."
            )
        return None

    def close(self) -> None:
        self._manager.close()
