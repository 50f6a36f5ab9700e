"""Tiny trained runs for the export and sampling tests: a couple of steps of
``train_and_evaluate`` on a small text file, byte (or small BPE) tokens, seconds each."""

import pathlib

from umup_jax import config as config_lib
from umup_jax import train as train_lib

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "Of man's first disobedience, and the fruit of that forbidden tree whose mortal taste "
    "brought death into the world, and all our woe. Ünïcödé bytes: ½ → ∞.\n"
)

# Non-default HPs: every u-μP α ≠ 1; μP's α's ≠ 1 and base width ≠ width.
HPARAMS = {
    "sp": {"init_std": 0.05},
    "mup": {"base_width": 8, "init_std": 0.05, "emb_mult": 2.5, "attn_mult": 1.5,
            "output_mult": 0.7, "emb_lr_mult": 2.0},
    "umup": {"attn_mult": 1.7, "ffn_act_mult": 0.6, "residual_mult": 1.4,
             "residual_attn_ratio": 0.5, "loss_softmax_mult": 1.9},
}

# head_dim ≠ width/heads and a non-default RoPE θ pin the q/k/v/o layouts and the frequencies.
UMUP_LAYOUT = {"model__head_dim": 8, "model__rope_theta": 500.0}


def text_file(directory: pathlib.Path, text: str = TEXT, repeat: int = 40) -> pathlib.Path:
    """Writes the training text (``corpus.txt``) and, beside it, a validation file with other
    bytes (``valid.txt``: the same text in upper case; train and valid files must differ)."""
    path = directory / "corpus.txt"
    path.write_text(text * repeat, encoding="utf-8")
    (directory / "valid.txt").write_text(text.upper() * repeat, encoding="utf-8")
    return path


def tiny_config(parametrization: str, directory: pathlib.Path, text_path: pathlib.Path,
                **overrides):
    """Depth 2, width 32, 2 heads, S = 32, 2 steps (checkpoints 1 and 2), RoPE, byte tokens,
    the non-default HPs above; ``overrides`` as ``section__key=value``."""
    cfg = config_lib.proxy_config(parametrization, "smoke")
    values = {
        "model.depth": 2, "model.num_heads": 2, "train.steps": 2, "train.eval_every": 2,
        "train.eval_batches": 1, "train.metrics_every": 1000, "train.checkpoint_every": 1,
        "train.batch_size": 4, "data.source": "text", "data.train_files": [str(text_path)],
        "data.valid_files": [str(text_path.with_name("valid.txt"))], "data.cache_dir": str(directory / "cache"),
        "data.prefetch": 1,
    }
    values.update({f"model.hparams.{k}": v for k, v in HPARAMS[parametrization].items()})
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in values.items():
        config_lib.set_key(cfg, key, value)
    return cfg


def train_tiny(parametrization: str, directory: pathlib.Path, **overrides) -> pathlib.Path:
    """Trains a tiny run in ``directory/<parametrization>`` and returns its workdir."""
    directory.mkdir(parents=True, exist_ok=True)
    workdir = directory / parametrization
    cfg = tiny_config(parametrization, directory, text_file(directory), **overrides)
    train_lib.train_and_evaluate(cfg, str(workdir))
    return workdir


_SHARED: dict = {}


def shared_run(tmp_path_factory, parametrization: str, **overrides) -> pathlib.Path:
    """:func:`train_tiny` once per pytest session for each (parametrization, overrides), so
    test modules reading the same kind of run share it (tests must not modify it)."""
    key = (parametrization, tuple(sorted(overrides.items())))
    if key not in _SHARED:
        _SHARED[key] = train_tiny(parametrization, tmp_path_factory.mktemp("tiny_run"),
                                  **overrides)
    return _SHARED[key]
