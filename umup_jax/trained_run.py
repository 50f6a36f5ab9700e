"""A trained run, read-only: its stored config, the params of one checkpoint, its tokenizer.

``export`` and ``sample`` read runs through this module, and nothing here writes to the run
directory.  That is why it does not use :class:`umup_jax.checkpoint.CheckpointStore`: its
``restore_latest`` moves an unreadable checkpoint aside (right when resuming a run, wrong when
only reading one), and an orbax ``CheckpointManager`` may tidy up temporary directories when
opened.  Instead the steps are listed from the directory names and one step's ``config`` (JSON)
and the ``params`` of its ``state`` item are restored with orbax directly, as host numpy arrays
(a partial restore: the optimizer state is never read).

A checkpoint is ``WORKDIR/checkpoints/<step>/{state,data,config}`` (see
:mod:`umup_jax.checkpoint`); the tokenizer is ``WORKDIR/tokenizer.json``, written by
``train_and_evaluate`` when the run's tokenizer is a Hugging Face one, or the byte tokenizer
when the run used ``data.tokenizer=bytes``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax.core import meta as flax_meta

from umup_jax import config as config_lib
from umup_jax import checkpoint as ckpt
from umup_jax import data as data_lib
from umup_jax import parametrization as P
from umup_jax import train as train_lib
from umup_jax.model import Decoder, ModelConfig, abstract_params

TOKENIZER_FILE = "tokenizer.json"


class RunReadError(ValueError):
    """A run directory, step or checkpoint that cannot be read (the message names it)."""


@dataclasses.dataclass
class TrainedRun:
    """One checkpoint of a run: ``params`` is the unboxed ``{'params': …}`` tree (numpy)."""

    workdir: pathlib.Path
    step: int
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: Any

    @property
    def model(self) -> Decoder:
        return Decoder(self.model_cfg)


def checkpoint_steps(workdir: pathlib.Path | str) -> list[int]:
    """The finished checkpoint steps of a run (orbax renames a step's directory to its number
    only when the save is complete; ``corrupt/`` and temporary directories are skipped)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def choose_step(workdir: pathlib.Path, step: Optional[int]) -> int:
    """``step``, or the newest checkpoint step if ``None``, of the run in ``workdir``;
    :class:`RunReadError` naming what is missing (the workdir, any checkpoint, that step).
    Reads only the directory listing."""
    if not workdir.is_dir():
        raise RunReadError(f"--workdir {workdir} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RunReadError(
            f"--workdir {workdir} has no checkpoints (looked for {workdir / 'checkpoints'}/<step>); "
            "train the run first, or point --workdir at a run directory"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise RunReadError(f"--step={step} does not exist in {workdir}: the checkpoints are "
                           f"steps {steps}")
    return step


def _damaged_files(item: pathlib.Path, error: Exception) -> list[str]:
    """The files of checkpoint item ``item`` to blame for ``error``: those the storage layer
    names (tensorstore says ``local file "…"``), else the item's JSON metadata files that do
    not parse (orbax's JSON errors name no file)."""
    named = [f for f in re.findall(r'local file "([^"]+)"', str(error))
             if pathlib.Path(f).is_file()]
    if named:
        return sorted(set(named))
    bad = []
    if item.is_dir():
        for f in sorted(item.rglob("*")):
            is_json = f.name.startswith("_") or f.name == "metadata" or (
                f.parent.name == "array_metadatas")
            if f.is_file() and is_json:
                try:
                    json.loads(f.read_text())
                except (ValueError, UnicodeDecodeError):
                    bad.append(str(f))
    return bad


def _unreadable(path: pathlib.Path, e: Exception) -> RunReadError:
    files = _damaged_files(path, e)
    blame = f": {', '.join(files)} {'is' if len(files) == 1 else 'are'} damaged" if files else ""
    detail = str(e).split(" [tensorstore_spec=")[0]
    detail = detail if len(detail) <= 400 else detail[:400] + " …"
    return RunReadError(
        f"checkpoint {path} is unreadable{blame} ({type(e).__name__}: {detail}); the run "
        "directory was left as it is (choose another --step)"
    )


def read_config(step_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """The run config stored in a checkpoint, over today's schema defaults (so a run saved
    before a config field existed still reads, with that field's default)."""
    path = step_dir / "config"
    try:
        stored = ocp.JsonCheckpointHandler().restore(path)
        stored = dict(stored)
        parametrization = stored["model"]["parametrization"]
    except Exception as e:  # any read or parse failure: a corrupt checkpoint
        raise _unreadable(path, e) from e
    if parametrization not in P.PARAMETRIZATIONS:
        raise RunReadError(f"{path}: model.parametrization={parametrization!r} is not one of "
                           f"{P.PARAMETRIZATIONS}")
    config = config_lib.base_config(parametrization)
    config.update(stored)
    return config


def _stored_param_shapes(state_dir: pathlib.Path) -> dict:
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), tree["params"])


def _shapes_text(tree) -> str:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    return ", ".join(f"{jax.tree_util.keystr(k)}: {v[0]}" for k, v in flat)


def read_params(state_dir: pathlib.Path, model: Decoder) -> Any:
    """The params of ``model`` from the ``state`` item of one checkpoint, as numpy arrays.

    The stored shapes must be the ones ``model`` declares (else :class:`RunReadError` listing
    both); unreadable files raise :class:`RunReadError` naming the item's path."""
    expected = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)),
                            flax_meta.unbox(abstract_params(model)))
    try:
        stored = _stored_param_shapes(state_dir)
    except Exception as e:
        raise _unreadable(state_dir, e) from e
    if stored != expected:
        raise RunReadError(
            f"the params in {state_dir} do not match the model its config describes:\n"
            f"  stored:   {_shapes_text(stored)}\n  expected: {_shapes_text(expected)}"
        )
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(*s), expected,
                                     is_leaf=lambda x: isinstance(x, tuple))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        restored = ocp.PyTreeCheckpointHandler().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                        partial_restore=True),
        )
        params = restored["params"]
    except Exception as e:
        raise _unreadable(state_dir, e) from e
    for name, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.all(np.isfinite(leaf)):
            raise RunReadError(f"checkpoint {state_dir} holds non-finite values in "
                               f"{jax.tree_util.keystr(name)}; choose another --step")
    return params


def load(workdir: pathlib.Path | str, step: Optional[int] = None) -> TrainedRun:
    """Step ``step`` (default: the newest) of the run in ``workdir``, read-only."""
    workdir = pathlib.Path(workdir).expanduser().resolve()
    step = choose_step(workdir, step)
    step_dir = workdir / "checkpoints" / str(step)
    damage = ckpt.verify(step_dir)  # the manifest written with the checkpoint, if any
    if damage is not None:
        raise RunReadError(f"checkpoint step {step} of {workdir} is damaged: {damage}; the run "
                           "directory was left as it is (pick another --step)")
    config = read_config(step_dir)
    try:
        vocab = _stored_param_shapes(step_dir / "state")["params"]["embedding"][0][0]
    except Exception as e:
        raise _unreadable(step_dir / "state", e) from e
    try:
        model_cfg = train_lib.model_config(config, vocab_size=int(vocab))
    except ValueError as e:
        raise RunReadError(f"the config stored in {step_dir / 'config'} is invalid: {e}") from e
    params = read_params(step_dir / "state", Decoder(model_cfg))
    return TrainedRun(workdir, step, config, model_cfg, params)


def load_tokenizer(workdir: pathlib.Path | str, config: ml_collections.ConfigDict):
    """The run's tokenizer: ``WORKDIR/tokenizer.json`` if present, the byte tokenizer for
    ``data.tokenizer=bytes``, else :class:`RunReadError` saying what is missing."""
    path = pathlib.Path(workdir) / TOKENIZER_FILE
    if path.is_file():
        import tokenizers

        try:
            return data_lib.HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), path.name)
        except Exception as e:
            raise RunReadError(f"{path} is not a readable tokenizer.json ({e})") from e
    if config.data.tokenizer == "bytes":
        return data_lib.ByteTokenizer()
    raise RunReadError(
        f"the run in {workdir} has no {TOKENIZER_FILE} and data.tokenizer="
        f"{config.data.tokenizer!r} is not 'bytes': runs save their Hugging Face tokenizer "
        f"there when training starts; for an older run or a pre-tokenized (memmap) one, copy "
        f"the tokenizer.json that made its data to {path}"
    )


def layer_params(params: Any, depth: int) -> Iterator[dict]:
    """Each layer's ``{name: array}`` in order, from ``layer_<i>`` subtrees (a Python loop of
    blocks) or from one ``layers`` subtree whose arrays are stacked on a leading axis of size
    ``depth`` (scanned blocks).  ``params`` is the inner tree (``tree['params']``)."""
    if "layers" in params:
        stacked = params["layers"]
        for name, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
            if leaf.shape[:1] != (depth,):
                raise RunReadError(f"stacked layer param {jax.tree_util.keystr(name)} has shape "
                                   f"{leaf.shape}: its leading axis must be depth={depth}")
        for i in range(depth):
            yield jax.tree.map(lambda a, i=i: a[i], stacked)
        return
    for i in range(depth):
        key = f"layer_{i}"
        if key not in params:
            raise RunReadError(f"the params have no {key!r} (layers: "
                               f"{sorted(k for k in params if k.startswith('layer'))})")
        yield params[key]
