"""Orbax checkpoints of a run: train state, data-iterator state and config, verified by
checksums, with fallback to an older checkpoint only when files are really damaged.

Each checkpoint ``DIR/checkpoints/<step>`` holds three orbax items: ``state`` (params,
optimizer state, step; sharded arrays), ``data`` (the grain iterator state and, under
:data:`TOKENS_KEY`, the fingerprint of the run's tokens,
:func:`umup_jax.data.token_fingerprint`; JSON) and ``config`` (the run's config, JSON), plus
``umup_manifest.json``: the size and CRC-32 of every file of the checkpoint, written by process
0 once orbax has finished the step.  Orbax writes to a temporary directory and renames it when
complete, so a run killed mid-save leaves no half checkpoint under a step name; a run killed
between that rename and the manifest leaves an intact checkpoint without a manifest, which is
read normally.

Restoring distinguishes three kinds of failure:

* **damaged files** (a file missing, truncated or changed against the manifest; or, for a
  checkpoint without a manifest, a read that fails on undecodable data): the checkpoint is
  *moved aside* to ``DIR/checkpoints/corrupt/<step>-<time>`` (never deleted, so it can be
  inspected) and the next newest is used;
* **a checkpoint that does not fit the model** (a shape mismatch): nothing is moved; the run
  stops with :class:`CheckpointMismatchError`.  The stored shapes are compared with the model's
  from the checkpoint's metadata *before* any array is read (:func:`shape_mismatches`), so the
  error names the arrays that differ (``params.params.layer_0.attn_qkv: stored (32, 3, 1,
  32), this model (64, 3, 2, 32)``) and no read is started and abandoned;
* **transient errors** (I/O, out of memory): retried a few times, then
  :class:`CheckpointReadError`; nothing is moved.

Good checkpoints are never overwritten: a step is only written once, and rotation keeps the
``keep`` newest.

With several processes (one store in each, on a shared filesystem) every verdict is common to
all of them (:mod:`umup_jax.processes`): process 0 lists the checkpoints and checks each one's
CRCs for all; each process reads its own shards of the state, and damage found by any one of
them moves the checkpoint aside once, after every process has finished reading it, before all
of them go on to the next newest; a failure in one process (a mismatch, a read that keeps
failing, a manifest that cannot be written) is raised in all, naming that process.  Without
this, one process could still be reading a checkpoint that another had moved, or raise alone
and leave the others waiting in orbax's next barrier.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
import zlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from umup_jax import processes
from umup_jax.processes import first_line

log = logging.getLogger(__name__)

MANIFEST = "umup_manifest.json"
# The key of the token fingerprint in a checkpoint's ``data`` item (next to grain's own keys).
TOKENS_KEY = "umup_token_fingerprint"
RETRIES = 3
RETRY_WAIT_S = 1.0


class CheckpointError(RuntimeError):
    """Base class of the checkpoint failures below."""


class NoUsableCheckpointError(CheckpointError):
    """Checkpoints existed but every one of them was damaged (all were moved aside)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's arrays do not fit the model being restored (nothing was moved)."""


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason other than damage (nothing was moved)."""


class DamagedCheckpointError(CheckpointError):
    """Files of a checkpoint are damaged; the store moves it aside once every process has
    seen the verdict (raised inside a read, never out of the store)."""


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
    """Records size and CRC-32 of every file under ``step_dir`` (atomically)."""
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _crc32(p)}
               for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": entries}, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: pathlib.Path) -> Optional[str]:
    """``None`` if every file matches the manifest (or there is no manifest to check
    against), else the first damage found, naming the file."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({first_line(e)})"
    for rel, want in entries.items():
        path = step_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if _crc32(path) != want["crc32"]:
            return f"{path} fails its CRC-32 check"
    return None


def _looks_damaged(exc: BaseException) -> bool:
    """For checkpoints without a manifest: does a read failure mean undecodable files?"""
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError, EOFError)):
        return True
    text = str(exc)
    return any(mark in text for mark in ("DATA_LOSS", "corrupt", "Corrupt", "truncated",
                                         "Unexpected end", "unexpected end", "checksum"))


def _shapes(tree: Any) -> dict[str, Optional[tuple]]:
    """{array name: shape (``None`` where a leaf has none)} of a pytree, each name its key path
    as orbax names the array: dict keys, attribute names and indices joined by dots
    (``opt_state.0.mu.params.embedding``)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."):
            (tuple(leaf.shape) if hasattr(leaf, "shape") else None) for path, leaf in leaves}


def shape_mismatches(stored_metadata: Any, abstract_state: Any) -> list[str]:
    """``'name: stored S, this model M'`` for every array that both the checkpoint's metadata
    (``StandardCheckpointHandler.metadata(step_dir / 'state')``) and ``abstract_state`` hold,
    with different shapes, the parameters (``params.…``) before the optimizer state's copies of
    them; empty if none differ.  Arrays only one side holds are left to orbax's own structure
    check, so a naming difference here can never refuse a checkpoint that restores."""
    tree = getattr(stored_metadata, "tree", stored_metadata)
    stored, model = _shapes(tree), _shapes(abstract_state)
    differ = [name for name, shape in model.items()
              if shape is not None and stored.get(name) is not None and stored[name] != shape]
    differ.sort(key=lambda name: not name.startswith("params."))  # stable: tree order within
    return [f"{name}: stored {stored[name]}, this model {model[name]}" for name in differ]


def _is_mismatch(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, ValueError) and any(
        mark in text for mark in ("not compatible with the stored shape", "Requested shape",
                                  "Structure mismatch", "tree structures do not match"))


# Failures that every process handles alike (see processes.together's ``shared``).
_SHARED = (DamagedCheckpointError, CheckpointMismatchError)


class CheckpointStore:
    """The checkpoints of one run directory.  ``writer`` (process 0) writes manifests, checks
    them and is the one process that moves damaged checkpoints aside; ``group`` is the run's
    processes (:func:`umup_jax.processes.current` by default), whose stores act together."""

    def __init__(self, directory: pathlib.Path | str, keep: int, writer: bool = True,
                 group=None):
        self.directory = pathlib.Path(directory).resolve()
        self.keep = keep
        self.writer = writer
        self.group = processes.current() if group is None else group
        self._manager = self._open()
        # Readers of single items (see _restore_item).
        self._state_reader = ocp.StandardCheckpointHandler()
        self._json_reader = ocp.JsonCheckpointHandler()

    def _together(self, what: str, fn):
        return processes.together(what, fn, self.group, shared=_SHARED)

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, enable_async_checkpointing=False
        )
        # Handlers named up front (not inferred from the first save's or restore's args), so
        # that a freshly opened store can read a step's metadata before restoring it.
        return ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def _restore_item(self, step: int, item: str, args: Any = None) -> Any:
        """``item`` (``state``, ``data`` or ``config``) of checkpoint ``step``, read by its
        orbax handler alone.  ``CheckpointManager.restore`` ends in a barrier over all
        processes (a device collective), which a process whose read failed never reaches, so
        the others would wait there for good; a handler's read involves no other process, and
        the processes compare outcomes afterwards (:func:`umup_jax.processes.together`)."""
        directory = self.path(step) / item
        if item == "state":
            return self._state_reader.restore(directory, args=args)
        return self._json_reader.restore(directory)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    # -- writing --------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, config: dict,
             token_fingerprint: Optional[str] = None) -> bool:
        """Saves ``step`` unless it already exists (a good checkpoint is never rewritten)."""
        if step in self._manager.all_steps():
            return False
        if token_fingerprint is not None:
            data_state = {**data_state, TOKENS_KEY: token_fingerprint}
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
        self._together(f"writing the manifest of checkpoint step {step}",
                       lambda: write_manifest(self.path(step)) if self.writer else None)
        return True

    # -- damage ---------------------------------------------------------------------------
    def quarantine(self, step: int, reason: str) -> pathlib.Path:
        """Moves a damaged checkpoint to ``corrupt/<step>-<time>`` and says so.  Called by
        every process at once: the writer moves it, then all re-list the directory."""
        def move() -> str:
            target = self.directory / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            if self.writer:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.path(step)), str(target))
            return str(target)

        target = pathlib.Path(processes.from_main(
            f"moving the damaged checkpoint step {step} aside", move, self.group))
        self._manager.reload()  # forget the moved step (no barrier, unlike a reopen)
        msg = f"checkpoint step {step} is damaged ({reason}); moved to {target}"
        log.warning(msg)
        if self.writer:
            print(f"WARNING: {msg}", flush=True)
        return target

    def _agreed_read(self, step: int, what: str, fn):
        """:meth:`_read` in every process: damage found by any → moved aside and ``None`` in
        all; any other failure raised in all."""
        try:
            return self._together(f"reading the {what} of checkpoint step {step}",
                                  lambda: self._read(step, what, fn))
        except DamagedCheckpointError as e:
            self.quarantine(step, str(e))
            return None

    def _read(self, step: int, what: str, fn):
        """``fn()`` with retries for transient errors; damaged files raise
        :class:`DamagedCheckpointError`; a mismatch or persistent failure raises (nothing
        moved)."""
        for attempt in range(RETRIES):
            try:
                return fn()
            except Exception as e:  # classified below; never silently swallowed
                if _looks_damaged(e):
                    raise DamagedCheckpointError(f"{what} unreadable: {first_line(e)}") from e
                if _is_mismatch(e):
                    raise self._mismatch(step, first_line(e)) from e
                if attempt + 1 == RETRIES:
                    raise CheckpointReadError(
                        f"could not read the {what} of checkpoint step {step} in "
                        f"{self.directory} after {RETRIES} tries ({first_line(e)}); it was "
                        "left in place. If this persists, check the disk and free memory"
                    ) from e
                log.warning("reading checkpoint %s failed (%s); retrying", step, first_line(e))
                time.sleep(RETRY_WAIT_S * (attempt + 1))
        return None  # unreachable

    def _mismatch(self, step: int, why: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not fit this model ({why}); it "
            "was left in place. Train this config in a new --workdir, or pass "
            "--config.train.restart=True to keep the old checkpoints aside and start from "
            "step 0")

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises :class:`CheckpointMismatchError` naming the arrays whose stored shape differs
        from the model's, read from the checkpoint's metadata before any array is.  Metadata
        that cannot be read is left to the restore itself to classify (damage, transient)."""
        try:
            stored = self._state_reader.metadata(self.path(step) / "state")
        except Exception:  # the restore below reports what is wrong with the files
            return
        if stored is None:
            return
        differ = shape_mismatches(stored, abstract_state)
        if differ:
            shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more"
                                              if len(differ) > 4 else "")
            raise self._mismatch(step, f"{len(differ)} array(s) differ in shape: {shown}")

    def newest_intact(self) -> Optional[tuple[int, dict]]:
        """(step, stored config) of the newest checkpoint whose files verify and whose config
        reads; damaged ones on the way are moved aside.  ``None`` if there were none;
        :class:`NoUsableCheckpointError` if there were some and all were damaged."""
        damaged = []
        for step in reversed(processes.from_main("listing the checkpoints", self.steps,
                                                 self.group)):
            def check(step=step):
                reason = verify(self.path(step)) if self.writer else None  # once, for all
                if reason is not None:
                    raise DamagedCheckpointError(reason)
                return self._read(step, "config",
                                  lambda: self._restore_item(step, "config"))

            try:
                config = self._together(f"checking checkpoint step {step}", check)
            except DamagedCheckpointError as e:
                self.quarantine(step, str(e))
                damaged.append(step)
                continue
            return step, dict(config)
        if damaged:
            raise NoUsableCheckpointError(
                f"no checkpoint in {self.directory} could be restored (damaged: steps "
                f"{sorted(damaged)}, moved to its corrupt/ folder). Remove the workdir or "
                "point --workdir elsewhere to start fresh."
            )
        return None

    def restore(self, step: int, abstract_state: Any) -> Optional[tuple[Any, dict]]:
        """(state, data_state) of ``step``; ``None`` if its files turned out damaged (then
        it was moved aside); :class:`CheckpointMismatchError` naming the arrays whose shapes
        differ from ``abstract_state``'s, before anything is read."""
        self._together(f"comparing the shapes of checkpoint step {step}",
                       lambda: self._check_shapes(step, abstract_state))
        state = self._agreed_read(step, "state", lambda: self._restore_item(
            step, "state", ocp.args.StandardRestore(abstract_state)))
        if state is None:
            return None
        data_state = self._agreed_read(step, "data", lambda: self._restore_item(step, "data"))
        if data_state is None:
            return None
        data_state = dict(data_state)
        data_state.pop(TOKENS_KEY, None)
        return state, data_state

    def token_fingerprint(self, step: int) -> Optional[str]:
        """The token fingerprint stored with ``step`` (``None`` for a checkpoint written before
        fingerprints were stored, or one whose data item turned out damaged: moved aside)."""
        data = self._agreed_read(step, "data", lambda: self._restore_item(step, "data"))
        if data is None:
            return None
        value = dict(data).get(TOKENS_KEY)
        return None if value is None else str(value)

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, data_state) of the newest intact checkpoint (damaged ones are moved
        aside on the way), or ``None`` if there is none.  It does not compare configs: the
        train loop checks the stored config first (:mod:`umup_jax.identity`)."""
        while (found := self.newest_intact()) is not None:
            restored = self.restore(found[0], abstract_state)
            if restored is not None:
                return (found[0], *restored)
        return None

    def close(self) -> None:
        self._manager.close()
