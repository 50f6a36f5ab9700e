"""Text from a trained run, to look at what the model learned.

``python -m umup_jax.sample --workdir=RUN --prompt=TEXT [--max_new_tokens=200]
[--temperature=0.8] [--top_k=0] [--seed=0] [--step=N]`` prints the prompt and its continuation
(stdout; a line about the run goes to stderr).

* The run's tokenizer encodes the prompt and decodes the text (``WORKDIR/tokenizer.json`` or
  the byte tokenizer; see :func:`umup_jax.trained_run.load_tokenizer`).
* Each new token costs one forward pass over a fixed window of the training length S: the
  context (at most S tokens) fills the front of an S-token buffer and the logits are read at
  its last real position.  Causal attention makes the padding after it invisible, and u-μP's
  attention scale is the one of training length S, so there is one compiled function for any
  prompt length and no KV cache.
* Longer than S: the context is a sliding window, the last S tokens (RoPE is relative, and the
  model was trained on windows that start anywhere in the text).
* The next-token distribution is the one the model was trained on: softmax(α·z/T) with α =
  ``rule.loss_logit_mult()`` (u-μP's α_loss-softmax, 1 otherwise) and temperature T, restricted
  to the ``top_k`` largest (0: all).  T = 0 is greedy decoding (argmax).  For a fixed
  ``seed`` the output is deterministic (token t draws with ``fold_in(key(seed), t)``).
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from umup_jax import trained_run
from umup_jax.model import Decoder, ModelConfig


def _check(field: str, ok: bool, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"--{field}={value!r} is invalid: it must be {allowed}")


@functools.lru_cache(maxsize=16)
def make_next_token(model_cfg: ModelConfig, temperature: float, top_k: int, vocab_limit: int):
    """The jitted ``(params, buffer (1, S) int32, last index, key) → next token id``, one per
    (model, sampling settings).

    Ids ≥ ``vocab_limit`` (a model vocabulary padded beyond its tokenizer's) are never drawn."""
    model = Decoder(model_cfg)
    mult = model_cfg.rule.loss_logit_mult()
    vocab = model_cfg.vocab_size

    def next_token(params, buffer, last, key):
        z = model.apply(params, buffer)[0]
        logits = jax.lax.dynamic_index_in_dim(z, last, axis=0, keepdims=False)
        logits = logits.astype(jnp.float32) * mult
        if vocab_limit < vocab:
            logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits >= kth, logits, -jnp.inf)
        return jax.random.categorical(key, logits)

    return jax.jit(next_token)


def generate(run: trained_run.TrainedRun, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.8, top_k: int = 0, seed: int = 0,
             vocab_limit: int | None = None) -> list[int]:
    """``max_new_tokens`` token ids continuing ``prompt_ids`` (see the module docstring)."""
    cfg = run.model_cfg
    vocab_limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
    _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens >= 0,
           max_new_tokens, "an integer >= 0")
    _check("temperature", temperature >= 0 and np.isfinite(temperature), temperature,
           "a number >= 0 (0: greedy)")
    _check("top_k", isinstance(top_k, int) and 0 <= top_k <= vocab_limit, top_k,
           f"an integer in [0, {vocab_limit}] (0: no top-k)")
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("--prompt is empty: the model needs at least one token to continue")
    if max(ids) >= cfg.vocab_size or min(ids) < 0:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got "
                         f"[{min(ids)}, {max(ids)}]")
    S = cfg.seq_len
    next_token = make_next_token(cfg, float(temperature), int(top_k), vocab_limit)
    params = jax.device_put(run.params)
    key = jax.random.key(seed)
    buffer = np.zeros((1, S), np.int32)
    new: list[int] = []
    for t in range(max_new_tokens):
        window = (ids + new)[-S:]
        buffer[0, : len(window)] = window
        buffer[0, len(window):] = 0
        token = next_token(params, buffer, len(window) - 1, jax.random.fold_in(key, t))
        new.append(int(token))
    return new


def sample_text(workdir, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int = 0, seed: int = 0, step: int | None = None) -> tuple[str, dict]:
    """(prompt + continuation as text, info) from the run in ``workdir``."""
    run = trained_run.load(workdir, step)
    tokenizer = trained_run.load_tokenizer(run.workdir, run.config)
    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    new = generate(run, prompt_ids, max_new_tokens, temperature, top_k, seed,
                   vocab_limit=tokenizer.vocab_size)
    info = {"step": run.step, "workdir": str(run.workdir), "prompt_tokens": len(prompt_ids),
            "new_tokens": new, "seq_len": run.model_cfg.seq_len,
            "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__)}
    return tokenizer.decode(prompt_ids + new), info


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory (with checkpoints/).")
    flags.DEFINE_string("prompt", None, "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
    flags.DEFINE_integer("seed", 0, "Random seed (fixed seed → same text).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.mark_flags_as_required(["workdir", "prompt"])


def main() -> None:
    from absl import flags

    from umup_jax import cli, failures

    FLAGS = flags.FLAGS
    with failures.exit_on_failure(None), cli.usage_errors():
        text, info = sample_text(FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens,
                                 FLAGS.temperature, FLAGS.top_k, FLAGS.seed, FLAGS.step)
    print(f"[step {info['step']} of {info['workdir']}, {info['tokenizer']} tokenizer, "
          f"{info['prompt_tokens']} prompt + {len(info['new_tokens'])} new tokens, window "
          f"{info['seq_len']}, temperature {FLAGS.temperature}, top_k {FLAGS.top_k}, "
          f"seed {FLAGS.seed}]", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    from absl import app, flags

    from umup_jax import cli

    _define_flags()
    entry, parse = cli.app_main(main, flags.FLAGS)
    app.run(entry, flags_parser=parse)
