"""Run configuration: the schema every config file fills in, its variants and its validation.

Config files in ``configs/`` call :func:`proxy_config` with their parametrization and accept an
argument string ``--config=configs/umup_proxy.py:ARG`` made of comma-separated variant names
(``cpu``, ``smoke``, ``wikitext103``, ``1b``, ``paper_ffn``) and ``key=value`` overrides, e.g.
``:cpu,train.steps=200,model.width=64``.

The defaults are the u-μP paper's Table 5 proxy (spec §0.1): width 256, depth 4, 4 heads of 64,
batch 64, sequence 256, 8192 steps, 2000 warm-up steps then cosine to 10%, AdamW (0.9, 0.999,
1e-8), independent weight decay 2⁻¹³, a 32k byte-level BPE vocabulary; all but the FFN width.
Its SwiGLU hidden size is 4·width, the authors' library's (``uu.MLP``), which gives 20.58 M
parameters at width 256 and 1.34 B at 4096; Table 5's 19.5 M and 1.07 B are those of an FFN of
8·width² parameters per block, a hidden size of ≈ 8/3·width, which the ``paper_ffn`` variant
sets (every committed result here was made with 4·width).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from typing import Any, Optional

import ml_collections

from umup_jax import parametrization as P

# Default global learning rates η.
# * u-μP: 2⁰ = 1, u-μP's own default (every HP 1).  On an octave grid at depth 2 it is the
#   optimum at every width we tried (README: width transfer, widths 32-256) and in the
#   independent search's LR line search; it is the optimum the authors' demo notebook reports
#   (spec §6.2).  Finer grids and other axes move it by up to 1.5 octaves (README, transfer
#   beyond width: half-octave widths 2^-0.5 … 2^0.5, depth 4-8 2^1.5, 8× steps 2^-1.5).  The
#   paper sweeps [2¹, 2³] on its 8192-step WikiText-103 proxy (Table 5): on a new setting,
#   sweep η.
# * μP and SP: 2⁻⁸, the centre (in log2) of the paper's μP range [2⁻¹⁰, 2⁻⁶].  SP's optimum
#   moves with width (we measured 2⁻⁷ … 2⁻¹⁰ at widths 32 … 256), so sweep it per width.
DEFAULT_LR = {"umup": 1.0, "mup": 2.0**-8, "sp": 2.0**-8}


def _hparams(parametrization: str) -> dict[str, Any]:
    rule = P.make_parametrization(parametrization, width=256)
    return {name: getattr(rule, name) for name in P.hparam_names(parametrization)
            if name != "shift"}


def base_config(parametrization: str = "umup") -> ml_collections.ConfigDict:
    """The full schema with the Table 5 proxy defaults for ``parametrization``."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0,  # 0: take the tokenizer's vocabulary size
        width=256, depth=4, num_heads=4, head_dim=0,  # 0: width // num_heads
        ffn_expansion=4.0, seq_len=256, position="rope", rope_theta=10000.0,
        parametrization=parametrization, hparams=_hparams(parametrization),
        # Compute dtype (float32 | bfloat16; params and optimizer state stay fp32) and the
        # residual stream's (float32, as under torch autocast, or bfloat16 with bf16 compute).
        dtype="float32", residual_dtype="float32", norm_eps=1e-5,
        # FP8: a preset (none | paper_simple | paper_large), then per-group overrides
        # (qkv, attn_out, ffn_in, ffn_down, readout → bf16 | fp8 | fp8_e5m2_input | fp8_dynamic).
        fp8="none", fp8_groups={"qkv": "", "attn_out": "", "ffn_in": "", "ffn_down": "",
                                "readout": ""},
        # GPU scale: blocks under nn.scan (params stacked on a leading `layers` axis; changes
        # the checkpoint layout), rematerialisation (none | full | dots_saveable) and the
        # attention kernel (xla | cudnn | auto: cudnn on a GPU for bf16 where it can run);
        # loss_chunks: the readout and loss over this many sequence chunks, one at a time, with
        # their gradients, so the (batch, seq, vocab) logits never exist whole (must divide
        # seq_len; umup_jax/loss_chunks.py).
        scan_layers=False, remat="none", attention_impl="auto", loss_chunks=1,
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=DEFAULT_LR[parametrization], b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=2.0**-13, schedule="cosine", warmup_steps=2000, final_lr_fraction=0.1,
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="bundled", data_dir="", train_files=[""], valid_files=[""],
        train_bin="", valid_bin="", bin_dtype="uint16",
        hf_name="", hf_config="", hf_text_field="text",
        tokenizer="bpe", vocab_size=32000, cache_dir="", shuffle_seed=0, prefetch=2,
        # source="prepared": a directory written by `python -m umup_jax.prepare_data`, and the
        # prepare_data arguments that make it (shown when it is missing).
        prepared_dir="", prepare_args="",
        # source="hf": split names (WikiText: train/validation/test) and what a document is
        # ("rows": each row; "wikitext": rows grouped into articles at " = Title = " headings);
        # hf_streaming: stream the dataset while it is prepared (as prepare_data's default
        # --hf_streaming) instead of downloading it whole first; the same tokens either way.
        hf_train_split="train", hf_valid_split="validation", hf_documents="rows",
        hf_streaming=True,
    ))
    # Device mesh (sizes, one may be -1 = the rest) and multi-host settings (empty: single
    # process, or taken from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1))
    c.train = ml_collections.ConfigDict(dict(
        steps=8192, batch_size=64,
        # Split each step's batch into this many micro-batches (a lax.scan inside the jitted
        # step): the same update with less activation memory.  Must divide the per-device batch.
        grad_accum_steps=1,
        # With FSDP (mesh.fsdp > 1) and grad_accum_steps > 1: all-gather the fp32 params once
        # per step before the micro-batches instead of in each (the same update; more memory:
        # each device holds its data replica's whole params through the step).
        fsdp_gather_once=False,
        # With FSDP and grad_accum_steps > 1: sum each device's rows' gradients unreduced
        # through the micro-batches and reduce-scatter them once per step instead of in each
        # (the same update; more memory: a whole fp32 gradient per device).  With
        # fsdp_gather_once too: ZeRO-1's schedule.
        fsdp_reduce_once=False,
        eval_every=512, eval_batches=16, eval_batch_size=64,
        log_every=10, metrics_every=256,
        checkpoint_every=1024, keep_checkpoints=3,
        nan_policy="stop",  # stop | ignore
        progress=True,
        # Resuming a workdir whose checkpoints were made by a different run config is refused;
        # True moves that run (checkpoints, metrics, results) to WORKDIR/previous/<time>/ and
        # starts from step 0.  Nothing is ever deleted.
        restart=False,
    ))
    return c


VARIANTS = {
    # Finishes in under 5 minutes on 2 CPU cores with the loss clearly falling.
    "cpu": {
        "model.width": 128, "model.depth": 2, "model.num_heads": 2, "model.seq_len": 128,
        "data.vocab_size": 2048,
        "train.steps": 600, "train.batch_size": 16, "train.eval_every": 200,
        "train.eval_batches": 8, "train.eval_batch_size": 16, "train.metrics_every": 100,
        "train.checkpoint_every": 200, "optimizer.warmup_steps": 100,
    },
    # The paper's proxy data (Table 5): WikiText-103 raw, 32k byte-level BPE, prepared once
    # with the command in data.prepare_args (a GPU path: ~120 M train tokens).
    "wikitext103": {
        "data.source": "prepared",
        "data.prepared_dir": "~/.cache/umup_jax/prepared/wikitext103-bpe32k",
        "data.prepare_args": ("--source=hf --hf_name=Salesforce/wikitext "
                              "--hf_config=wikitext-103-raw-v1 --hf_documents=wikitext "
                              "--nohf_streaming --tokenizer=bpe:32000"),
        "data.vocab_size": 32000,
    },
    # The ~1B model of issue 11's speed table (experiments/bench_gpu.py's "1b" shape) as a
    # run for one host of 8 H100s: width 2048, depth 16, 32 heads of 64 (1.07 B params in the
    # blocks, 1.20 B with the 32k embedding and readout), sequence 2048, 64 sequences (131,072 tokens) per step, bf16
    # compute, blocks scanned and fully rematerialised, the loss over 8 chunks.  On fewer or
    # smaller GPUs the trainer's memory check says what to add (train.grad_accum_steps,
    # mesh.fsdp).  Combine it with data, e.g. `:wikitext103,1b` (BUILD.md, "A ~1B run").
    "1b": {
        "model.width": 2048, "model.depth": 16, "model.num_heads": 32, "model.seq_len": 2048,
        "model.dtype": "bfloat16", "model.scan_layers": True, "model.remat": "full",
        "model.loss_chunks": 8, "train.batch_size": 64, "train.eval_batch_size": 64,
    },
    # The FFN width of the paper's models: a SwiGLU hidden size of 2.6640625·width (341/128,
    # Aleph Alpha's factor, spec §9; ≈ 8/3), 8·width² FFN parameters per block.  Table 5's
    # parameter counts are these: 19,527,680 at width 256 (its 19.5 M) and 1,066,926,080 at
    # width 4096 (1.07 B); the default 4·width gives 20,578,304 and 1,335,885,824.  Needs a
    # width that is a multiple of 128 (the hidden size must be whole).
    "paper_ffn": {"model.ffn_expansion": 2.6640625},
    # Seconds, for tests.
    "smoke": {
        "model.width": 32, "model.depth": 1, "model.num_heads": 1, "model.seq_len": 32,
        "data.tokenizer": "bytes",
        "train.steps": 6, "train.batch_size": 4, "train.eval_every": 3,
        "train.eval_batches": 2, "train.eval_batch_size": 4, "train.log_every": 1,
        "train.metrics_every": 3, "train.checkpoint_every": 3, "train.progress": False,
        "optimizer.warmup_steps": 2,
    },
}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unknown_key(key: str, parts: list[str], node: ml_collections.ConfigDict) -> ValueError:
    """``config key 'train.stepz' is unknown (did you mean 'train.steps'?)``; ``parts`` is
    ``key`` up to the first part that ``node`` lacks."""
    close = difflib.get_close_matches(parts[-1], list(node.keys()), n=1)
    hint = f" (did you mean {'.'.join(parts[:-1] + close)!r}?)" if close else ""
    return ValueError(f"config key {key!r} is unknown{hint}")


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding ``key`` (``a.b.c``) and its last part; an unknown key raises
    ``ValueError`` naming it."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            raise _unknown_key(key, parts[: i + 1], node)
        if not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"config key {key!r} is unknown: {'.'.join(parts[: i + 1])!r} is "
                             "a value, not a group of keys")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        if parts[-2:-1] == ["hparams"]:
            raise ValueError(
                f"config key {key!r} is unknown: hparams of {config.model.parametrization!r} "
                f"are {sorted(node.keys())}"
            )
        raise _unknown_key(key, parts, node)
    return node, leaf


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """An unknown ``key`` (``a.b.c``) raises ``ValueError`` naming it, as :func:`set_key`."""
    _lookup(config, key)


def expected_kind(current: Any) -> str:
    """What a config value like ``current`` must be, in words (``"an integer"``)."""
    for kind, words in ((bool, "True or False"), (int, "an integer"), (float, "a number"),
                        (str, "a string"), (list, "a list")):
        if isinstance(current, kind):
            return words
    return f"a {type(current).__name__}"


def wrong_type(key: str, current: Any, value: Any) -> ValueError:
    """``config key 'train.steps' expects an integer (it is 8192), got 'abc'``; for a group
    of keys (``model.hparams``), which keys it holds."""
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        names = sorted(current.keys())
        return ValueError(f"config key {key!r} is a group of keys ({', '.join(names)}): set "
                          f"them one by one, e.g. {key}.{names[0] if names else 'name'}=…, "
                          f"not {key}={value!r}")
    return ValueError(f"config key {key!r} expects {expected_kind(current)} (it is "
                      f"{current!r}), got {value!r}")


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets ``a.b.c = value``; an unknown key or a value of the wrong type raises
    ``ValueError`` naming it."""
    node, leaf = _lookup(config, key)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, list) and isinstance(value, str):
        value = [value]
    try:
        node[leaf] = value
    except TypeError:  # ml_collections: the value cannot take the field's type
        raise wrong_type(key, current, value) from None


def apply_arg(config: ml_collections.ConfigDict, arg: Optional[str]) -> ml_collections.ConfigDict:
    """Applies a ``get_config`` argument: variant names and ``key=value`` overrides."""
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, value = token.split("=", 1)
            set_key(config, key.strip(), _parse_value(value.strip()))
        elif token in VARIANTS:
            for key, value in VARIANTS[token].items():
                set_key(config, key, value)
        else:
            raise ValueError(
                f"config argument {token!r} is invalid: use variants {sorted(VARIANTS)} "
                "or key=value overrides"
            )
    return config


def proxy_config(parametrization: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return apply_arg(base_config(parametrization), arg)


def check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key of ``config`` must exist in the schema (hparams are checked by the rule)."""
    reference = base_config(config.model.parametrization
                            if config.model.parametrization in P.PARAMETRIZATIONS else "umup")

    def walk(node, ref, prefix):
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in ref:
                raise ValueError(f"config key {path!r} is unknown")
            if path == "model.hparams":
                continue
            if isinstance(node[key], ml_collections.ConfigDict):
                walk(node[key], ref[key], path + ".")

    walk(config, reference, "")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:ARG]`` → its ``get_config(ARG)`` (for CLIs other than main)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
