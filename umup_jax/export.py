"""Export a trained run as a plain Hugging Face Llama: every forward multiplier in the weights.

``python -m umup_jax.export --workdir=RUN [--step=N] --out=DIR [--format=hf] [--overwrite]``
writes ``DIR/config.json`` (``LlamaForCausalLM``), ``DIR/model.safetensors`` (numpy API of
``safetensors``, fp32) and, for the run's tokenizer, ``DIR/tokenizer.json`` +
``tokenizer_config.json``; then, when ``transformers`` and ``torch`` are installed, it reloads
the directory with them and prints the max relative logit difference against our model.

SP, μP and u-μP models compute the same function as a standard Llama (pre-norm RMSNorm,
rotate-half RoPE, SwiGLU, untied embedding and head, no biases) up to Python-float multipliers,
and the rule object (:attr:`umup_jax.model.ModelConfig.rule`) knows every one of them.  Nothing
here re-derives a multiplier: each factor below is a call on the rule.  With A(w) =
``rule.forward_multiplier(meta_w)``, our kernels (in, out) transposed to torch's (out, in):

* ``embed_tokens = A(emb)·E``; per-linear multipliers (u-μP's 1/√fan_in, μP's α_out/m …) go
  into their weight.
* Attention: HF computes softmax(q·kᵀ/√d_head); ours uses ``rule.attention_logit_scale``
  (μP and u-μP: α_attn/d_head), so ``q_proj = A(qkv)·√d_head·logit_scale·W_q`` (RoPE is a
  rotation, so the factor commutes with it); ``k_proj, v_proj = A(qkv)·W_{k,v}``.  The
  attention op's output factor ``rule.attention_output_scale(S, d_head)`` (u-μP's unit scale,
  computed from the training sequence length S = ``model.seq_len``) goes into ``o_proj``.
* SwiGLU: ours is ``s·up·gate·σ(m·gate) = (s/m)·up·silu(m·gate)`` with (m, s) =
  ``rule.ffn_activation_mults()``; so ``gate_proj = m·A(gate)·W_gate``,
  ``down_proj = (s/m)·A(down)·W_down``.
* Residual stream (u-μP, spec §4.1): x_{k+1} = a_k·f_k(norm(x_k)) + b_k·x_k over the 2L
  branches, (a_k, b_k) from τ_k = ``rule.residual_taus(L)[k]``.  With P_0 = 1,
  P_{k+1} = P_k·b_k and x_k = P_k·y_k this is the plain y_{k+1} = y_k + (a_k/P_{k+1})·
  f_k(norm(P_k·y_k)), and RMSNorm removes P_k (below), so ``a_k/P_{k+1}`` goes into the
  branch's output projection (``o_proj`` or ``down_proj``).  SP and μP have a_k = b_k = 1.
* ``lm_head = α·A(readout)·W_out`` with α = ``rule.loss_logit_mult()``: u-μP's loss is the
  cross-entropy of softmax(α_loss·z), so the exported model's logits are α_loss·z and its
  ordinary cross-entropy is our training loss.  Norm gains are 1; embeddings stay untied.

**The norm ε.**  RMSNorm(P·y) with ε equals RMSNorm(y) with ε/P², but HF Llama has one
``rms_norm_eps`` for every norm, and we write ``model.norm_eps``.  Each u-μP norm (the final one
too) therefore computes y/√(ms(y)+ε) instead of y/√(ms(y)+ε/P_k²), a relative error of
√((ms(x)+ε)/(ms(x)+ε·P_k²)) − 1 ≈ ε·(1−P_k²)/(2·ms(x_k)) in terms of our stream x_k.  P_k
only falls along the stack, to P_{2L}² = 1/(1 + 2·α_res²) at the end (the embedding's share of
the final unit-variance stream), so the error is below ε/(2·ms(x)): about 5·10⁻⁶ for ε = 10⁻⁵
and u-μP's unit-RMS stream.  It is the larger part of a u-μP export's logit error (on a tiny
run: 7·10⁻⁶ relative, 8·10⁻⁷ with each norm given its exact ε/P_k²), and far inside the 10⁻⁴
the tests ask for.  SP and μP have P_k = 1: exact.

Refused (:class:`ExportError`, before anything is written): NoPE models (``position='none'``;
HF Llama always applies RoPE).  FP8 and bf16 runs are exported from their fp32 params; the
verification compares with our fp32 forward without FP8 casts.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from umup_jax import data as data_lib
from umup_jax import parametrization as P
from umup_jax import trained_run
from umup_jax.model import Decoder, ModelConfig, abstract_params

FORMATS = ("hf",)
WEIGHTS_FILE = "model.safetensors"


class ExportError(ValueError):
    """A model or an output directory that cannot be exported to (the message says why)."""


def check_exportable(model_cfg: ModelConfig) -> None:
    """Raises :class:`ExportError` for a model HF ``LlamaForCausalLM`` cannot express."""
    if model_cfg.position != "rope":
        raise ExportError(
            f"model.position={model_cfg.position!r} cannot be exported: Hugging Face "
            "LlamaForCausalLM always applies rotary position embeddings, so a NoPE model has no "
            "Llama equivalent"
        )


def residual_folds(rule: P.Parametrization, depth: int) -> tuple[list[float], list[float]]:
    """(branch factors a_k/P_{k+1}, stream scales P_k for k = 0 … 2L) of the 2L residual
    branches (even k attention, odd k FFN); all ones for the plain ``x + f(x)`` residual."""
    taus = rule.residual_taus(depth)
    if taus is None:
        return [1.0] * (2 * depth), [1.0] * (2 * depth + 1)
    factors, scales = [], [1.0]
    for tau in taus:
        a, b = P.residual_weights(tau)
        scales.append(scales[-1] * b)
        factors.append(a / scales[-1])
    return factors, scales


def _scaled(w: np.ndarray, factor: float) -> np.ndarray:
    """factor·w rounded once to fp32 (the product is taken in float64)."""
    return (np.asarray(w, np.float64) * factor).astype(np.float32)


def hf_tensors(model_cfg: ModelConfig, params: Any) -> tuple[dict[str, np.ndarray], dict]:
    """The ``LlamaForCausalLM`` state dict (fp32 numpy, torch layouts) of our ``params``
    (``{'params': …}``), and the factor folded into each tensor (for the report).

    Layouts: our fused QKV kernel is (d, 3, H, Dh) and HF's ``q_proj`` (H·Dh, d) with head h,
    dim e at row h·Dh + e, so ``q_proj = W[:, 0].reshape(d, H·Dh).T``; ``attn_out`` (H, Dh, d)
    becomes ``o_proj = W.reshape(H·Dh, d).T``; every other kernel is transposed.
    """
    check_exportable(model_cfg)
    rule = model_cfg.rule
    d, h, dh, L = model_cfg.width, model_cfg.num_heads, model_cfg.head_dim, model_cfg.depth
    S = model_cfg.seq_len
    tree = params["params"]
    meta = P.param_metadata(abstract_params(Decoder(model_cfg)))["params"]
    A = rule.forward_multiplier
    branch, _ = residual_folds(rule, L)
    q_factor = rule.attention_logit_scale(dh) * math.sqrt(dh)
    attn_out_scale = rule.attention_output_scale(S, dh)
    gate_mult, act_scale = rule.ffn_activation_mults()

    tensors: dict[str, np.ndarray] = {}
    folds: dict[str, float] = {}

    def put(name: str, w: np.ndarray, factor: float, transpose: bool = True) -> None:
        w = _scaled(w, factor)
        tensors[name] = np.ascontiguousarray(w.T if transpose else w)
        folds[name] = factor

    put("model.embed_tokens.weight", tree["embedding"], A(meta["embedding"]), transpose=False)
    layers = zip(trained_run.layer_params(tree, L), trained_run.layer_params(meta, L))
    for i, (w, m) in enumerate(layers):
        pre = f"model.layers.{i}."
        qkv = np.asarray(w["attn_qkv"])
        a_qkv = A(m["attn_qkv"])
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            put(pre + f"self_attn.{proj}.weight", qkv[:, j].reshape(d, h * dh),
                a_qkv * (q_factor if proj == "q_proj" else 1.0))
        put(pre + "self_attn.o_proj.weight", np.asarray(w["attn_out"]).reshape(h * dh, d),
            A(m["attn_out"]) * attn_out_scale * branch[2 * i])
        put(pre + "mlp.gate_proj.weight", w["ffn_gate"], gate_mult * A(m["ffn_gate"]))
        put(pre + "mlp.up_proj.weight", w["ffn_up"], A(m["ffn_up"]))
        put(pre + "mlp.down_proj.weight", w["ffn_down"],
            act_scale / gate_mult * A(m["ffn_down"]) * branch[2 * i + 1])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[pre + f"{norm}.weight"] = np.ones((d,), np.float32)
    tensors["model.norm.weight"] = np.ones((d,), np.float32)
    put("lm_head.weight", tree["readout"], rule.loss_logit_mult() * A(meta["readout"]))
    return tensors, folds


def hf_config(model_cfg: ModelConfig, provenance: Optional[dict] = None) -> dict:
    """``config.json`` of the exported ``LlamaForCausalLM`` (transformers 4.x and 5.x keys)."""
    check_exportable(model_cfg)
    theta = float(model_cfg.rope_theta)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.width,
        "intermediate_size": model_cfg.ffn_hidden,
        "num_hidden_layers": model_cfg.depth,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.seq_len,
        "rms_norm_eps": float(model_cfg.norm_eps),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if provenance:
        config["umup_jax"] = provenance
    return config


# ---------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------


def write_tokenizer(workdir: pathlib.Path, config, out: pathlib.Path, seq_len: int) -> str:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (so ``AutoTokenizer`` loads
    them) for the run's tokenizer; returns a line for the report."""
    source = workdir / trained_run.TOKENIZER_FILE
    if source.is_file():
        shutil.copyfile(source, out / "tokenizer.json")
        what = f"tokenizer.json (from {source})"
    elif config.data.tokenizer == "bytes":
        data_lib.ByteTokenizer.as_hf(eos_token=None).save(out / "tokenizer.json")
        what = "tokenizer.json (UTF-8 bytes: token id = byte value)"
    else:
        return (f"no tokenizer written: the run has no {source.name} and data.tokenizer="
                f"{config.data.tokenizer!r}; copy the tokenizer that made its data to {out}")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    return what


# ---------------------------------------------------------------------------------------------
# Verification with transformers
# ---------------------------------------------------------------------------------------------


def reference_logits(model_cfg: ModelConfig, params: Any, tokens: np.ndarray) -> np.ndarray:
    """What the exported model must output: our fp32 forward (no FP8 casts) times the loss's
    softmax multiplier, in float64."""
    ref_cfg = model_cfg.replace(dtype="float32", fp8="none")
    z = jax.jit(Decoder(ref_cfg).apply)(params, tokens)
    return np.asarray(z, np.float64) * model_cfg.rule.loss_logit_mult()


def verify(out: pathlib.Path, model_cfg: ModelConfig, params: Any, batch_size: int = 2,
           seed: int = 0) -> Optional[dict]:
    """Reloads ``out`` with ``transformers`` (CPU torch, eager attention, fp32) and compares its
    logits with :func:`reference_logits` on ``batch_size`` random sequences of the training
    length S.  Returns ``{'max_rel_diff': max|Δ|/max|ref|, …}``, or ``None`` when transformers
    or torch is not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    tokens = np.random.default_rng(seed).integers(
        0, model_cfg.vocab_size, size=(batch_size, model_cfg.seq_len), dtype=np.int64)
    ref = reference_logits(model_cfg, params, tokens.astype(np.int32))
    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)).logits.double().numpy()
    diff = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    return {"max_rel_diff": diff, "tokens": tokens.shape, "transformers": transformers.__version__,
            "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------


def _check_out(out: pathlib.Path, workdir: pathlib.Path, overwrite: bool) -> None:
    # The run directory is never written: not as --out, not inside --out (--overwrite would
    # delete it), and no --out inside it (the temporary folder and the files would land there).
    if out == workdir or workdir.is_relative_to(out):
        raise ExportError(f"--out={out} would hold the run directory {workdir}; choose another")
    if out.is_relative_to(workdir):
        raise ExportError(f"--out={out} is inside the run directory {workdir}, which export "
                          "never writes to: choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out={out} exists and is not empty: choose an empty or new "
                          "directory, or pass --overwrite to replace it")


def _usual_permissions(directory: pathlib.Path) -> None:
    """mkdtemp makes a 0700 directory; give it and its files the umask's usual modes."""
    directory.chmod(data_lib.usual_mode(directory=True))
    for f in directory.iterdir():
        f.chmod(data_lib.usual_mode())


def export(workdir, out, step: Optional[int] = None, fmt: str = "hf", overwrite: bool = False,
           check: bool = True, log=print) -> dict:
    """Exports step ``step`` (default newest) of the run in ``workdir`` to ``out``.

    Everything is checked before anything is written; the files are written to a temporary
    directory beside ``out`` and moved into place, so a failed export leaves no partial
    output.  Returns a summary dict (paths, step, folds, verification or ``None``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r} is invalid: allowed are {FORMATS}")
    workdir = pathlib.Path(workdir).expanduser().resolve()
    out = pathlib.Path(out).expanduser().resolve()
    _check_out(out, workdir, overwrite)
    step = trained_run.choose_step(workdir, step)  # a missing run is named before a missing extra
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ExportError("export writes safetensors: pip install safetensors (the `export` "
                          "extra)") from e

    run = trained_run.load(workdir, step)
    check_exportable(run.model_cfg)
    tensors, folds = hf_tensors(run.model_cfg, run.params)
    cfg = run.model_cfg
    provenance = {"workdir": str(workdir), "step": run.step,
                  "parametrization": cfg.parametrization, "hparams": dict(cfg.hparams),
                  "seq_len": cfg.seq_len}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, provenance), indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "source": f"umup_jax {workdir} step {run.step}"})
        tok_line = write_tokenizer(workdir, run.config, tmp, cfg.seq_len)
        _usual_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.size for t in tensors.values())
    log(f"exported step {run.step} of {workdir} ({cfg.parametrization}, width {cfg.width}, "
        f"depth {cfg.depth}, vocab {cfg.vocab_size}, {n_params:,} params) to {out}")
    log(f"  {WEIGHTS_FILE} ({(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB fp32), "
        f"config.json (LlamaForCausalLM), {tok_line}")
    layer0 = {k.split(".", 3)[-1]: v for k, v in folds.items() if k.startswith("model.layers.0.")}
    log("  folded multipliers: embed_tokens ×{:.6g}, lm_head ×{:.6g}; layer 0: {}".format(
        folds["model.embed_tokens.weight"], folds["lm_head.weight"],
        ", ".join(f"{k.replace('.weight', '')} ×{v:.6g}" for k, v in layer0.items())))
    if cfg.fp8 != "none" or cfg.dtype != "float32":
        log(f"  note: the run computes in {cfg.dtype} with FP8 policy {cfg.fp8!r}; the export "
            "holds its fp32 params and matches our fp32 forward")
    result = {"out": out, "step": run.step, "folds": folds, "verification": None}
    if check:
        result["verification"] = v = verify(out, cfg, run.params)
        if v is None:
            log("  not verified: install transformers and torch (CPU) to reload and compare")
        else:
            log(f"  verified with transformers {v['transformers']}: max relative logit "
                f"difference {v['max_rel_diff']:.3g} (max|Δ|/max|logit| over "
                f"{v['tokens'][0]}×{v['tokens'][1]} random tokens at the training length)")
    return result


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module next to
    another entry point defines nothing)."""
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory (with checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory for the Hugging Face model.")
    flags.DEFINE_enum("format", "hf", FORMATS, "Output format: hf (LlamaForCausalLM).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
    flags.DEFINE_bool("verify", True, "Reload with transformers (if installed) and compare.")
    flags.mark_flags_as_required(["workdir", "out"])


def main() -> None:
    from absl import flags

    from umup_jax import cli, failures

    FLAGS = flags.FLAGS
    with failures.exit_on_failure(None), cli.usage_errors():
        export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, fmt=FLAGS.format,
               overwrite=FLAGS.overwrite, check=FLAGS.verify)


if __name__ == "__main__":
    from absl import app, flags

    from umup_jax import cli

    _define_flags()
    entry, parse = cli.app_main(main, flags.FLAGS)
    app.run(entry, flags_parser=parse)
