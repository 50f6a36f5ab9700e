"""Export to a Hugging Face Llama: round trip through transformers for SP, μP and u-μP with
non-default HPs (every multiplier folded into the weights), RoPE layout against transformers',
the residual-stream closed form, tokenizers, refusals and bad input (the run directory is never
modified)."""

import functools
import hashlib
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_runs
from umup_jax import data as data_lib
from umup_jax import export as export_lib
from umup_jax import parametrization as P
from umup_jax import trained_run
from umup_jax.model import ModelConfig, apply_rope

pytest.importorskip("safetensors", reason="export writes safetensors (the `export` extra)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # max|Δlogit| / max|logit|, fp32


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs with non-default HPs (tiny_runs.HPARAMS), depth 2, RoPE; the u-μP
    one also with head_dim ≠ width/heads and a non-default θ."""
    return {
        "sp": tiny_runs.shared_run(tmp_path_factory, "sp"),
        "mup": tiny_runs.shared_run(tmp_path_factory, "mup"),
        "umup": tiny_runs.shared_run(tmp_path_factory, "umup", **tiny_runs.UMUP_LAYOUT),
    }


@pytest.mark.parametrize("parametrization", ["sp", "mup", "umup"])
def test_round_trip_through_transformers(runs, tmp_path, parametrization):
    pytest.importorskip("torch", reason="the round trip needs torch (CPU)")
    transformers = pytest.importorskip("transformers", reason="the round trip needs transformers")
    workdir = runs[parametrization]
    before = _digest(workdir)
    lines = []
    result = export_lib.export(workdir, tmp_path / "hf", log=lines.append)
    diff = result["verification"]["max_rel_diff"]
    print(f"{parametrization}: max relative logit difference {diff:.3g}")
    assert diff <= TOLERANCE
    assert any(f"max relative logit difference {diff:.3g}" in line for line in lines)
    assert _digest(workdir) == before  # read-only

    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    run = trained_run.load(workdir)
    mc = run.model_cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        mc.width, mc.depth, mc.num_heads, mc.head_dim, mc.ffn_hidden, mc.vocab_size)
    assert cfg["rope_parameters"]["rope_theta"] == mc.rope_theta
    assert cfg["umup_jax"]["step"] == 2 and cfg["umup_jax"]["parametrization"] == parametrization
    # The exported model is a plain LlamaForCausalLM: norm gains 1, untied head.
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            assert float(tensor.min()) == float(tensor.max()) == 1.0, name
    assert not np.array_equal(state["lm_head.weight"].numpy(),
                              state["model.embed_tokens.weight"].numpy())
    # Its ordinary cross-entropy is our training loss (u-μP's is of softmax(α_loss·z)).
    import torch

    tokens = np.random.default_rng(1).integers(0, mc.vocab_size, size=(2, mc.seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).logits
        hf_loss = float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, mc.vocab_size), torch.from_numpy(targets).reshape(-1)))
    ours = float(jax.jit(functools.partial(run.model.apply, method=type(run.model).loss))(
        run.params, inputs.astype(np.int32), targets.astype(np.int32)))
    assert abs(hf_loss - ours) <= 1e-5 * ours


def test_export_asks_the_rule_for_every_fold():
    """The factor folded into each tensor is the product of the rule's multipliers (u-μP,
    every α ≠ 1; d = 16, 2 heads of 4, FFN 64, S = 8), written out by hand here."""
    from flax.core import meta as flax_meta
    from umup_jax import ops
    from umup_jax.model import Decoder, abstract_params

    cfg = ModelConfig(vocab_size=16, width=16, depth=2, num_heads=2, head_dim=4, seq_len=8,
                      parametrization="umup", hparams=tiny_runs.HPARAMS["umup"])
    shapes = flax_meta.unbox(abstract_params(Decoder(cfg)))
    params = {"params": {k: (np.ones(v.shape, np.float32) if hasattr(v, "shape") else
                             {n: np.ones(a.shape, np.float32) for n, a in v.items()})
                         for k, v in shapes["params"].items()}}
    tensors, folds = export_lib.hf_tensors(cfg, params)
    branch, _ = export_lib.residual_folds(cfg.rule, 2)
    a0, b0 = P.residual_weights(cfg.rule.residual_taus(2)[0])
    assert branch[0] == pytest.approx(a0 / b0)
    s = ops.silu_glu_scale(0.6)
    expected = {
        "model.embed_tokens.weight": 1.0,
        "model.layers.0.self_attn.q_proj.weight": 16**-0.5 * (1.7 / 4) * 4**0.5,
        "model.layers.0.self_attn.k_proj.weight": 16**-0.5,
        "model.layers.0.self_attn.v_proj.weight": 16**-0.5,
        "model.layers.0.self_attn.o_proj.weight": 8**-0.5 * ops.attention_scale(8, 4, 1.7)
        * branch[0],
        "model.layers.1.mlp.gate_proj.weight": 0.6 * 16**-0.5,
        "model.layers.1.mlp.up_proj.weight": 16**-0.5,
        "model.layers.1.mlp.down_proj.weight": s / 0.6 * 64**-0.5 * branch[3],
        "lm_head.weight": 1.9 / 16,
    }
    for name, factor in expected.items():
        assert folds[name] == pytest.approx(factor, rel=1e-12), name
        np.testing.assert_allclose(tensors[name], np.float32(factor), rtol=1e-7)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (8, 16)  # (H·Dh, d)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (16, 8)


def test_stacked_layers_export_like_a_python_loop():
    """Params whose blocks are stacked on a leading axis (a ``layers`` subtree, as scanned
    blocks store them) give the same tensors as ``layer_<i>`` subtrees."""
    cfg = ModelConfig(vocab_size=16, width=16, depth=3, num_heads=2, seq_len=8,
                      parametrization="umup", hparams=tiny_runs.HPARAMS["umup"])
    import jax
    from flax.core import meta as flax_meta
    from umup_jax.model import Decoder, abstract_params

    rng = np.random.default_rng(0)
    loop = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                        flax_meta.unbox(abstract_params(Decoder(cfg))))
    inner = loop["params"]
    stacked = {"params": {
        "embedding": inner["embedding"], "readout": inner["readout"],
        "layers": {k: np.stack([inner[f"layer_{i}"][k] for i in range(3)])
                   for k in inner["layer_0"]}}}
    a, _ = export_lib.hf_tensors(cfg, loop)
    b, _ = export_lib.hf_tensors(cfg, stacked)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    stacked["params"]["layers"]["ffn_up"] = stacked["params"]["layers"]["ffn_up"][:2]
    with pytest.raises(trained_run.RunReadError, match="leading axis must be depth=3"):
        export_lib.hf_tensors(cfg, stacked)


@pytest.mark.parametrize("residual_mult, ratio, depth", [(1.0, 1.0, 2), (1.4, 0.5, 3),
                                                          (0.3, 2.0, 1)])
def test_residual_stream_rescaling_closed_form(residual_mult, ratio, depth):
    """x_k = P_k·y_k with P_{k+1} = P_k·b_k; the final P² is the embedding's share of the
    unit-variance stream, 1/(1 + 2·α_res²); each branch weight is a_k/P_{k+1}."""
    rule = P.UMuP(residual_mult=residual_mult, residual_attn_ratio=ratio)
    branch, scales = export_lib.residual_folds(rule, depth)
    assert scales[-1] ** 2 == pytest.approx(1.0 / (1.0 + 2.0 * residual_mult**2))
    # Unrolling y_{k+1} = y_k + c_k·f_k recovers x: x_K = P_K·(x_0 + Σ c_k f_k).
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2 * depth, 5))
    x = y = rng.normal(size=5)
    for k, tau in enumerate(rule.residual_taus(depth)):
        a, b = P.residual_weights(tau)
        x = a * f[k] + b * x
        y = y + branch[k] * f[k]
    np.testing.assert_allclose(scales[-1] * y, x, rtol=1e-12)
    assert export_lib.residual_folds(P.SP(), depth) == ([1.0] * 2 * depth,
                                                         [1.0] * (2 * depth + 1))


def test_rope_matches_transformers():
    """Our rotate-half RoPE with θ^(-2i/d) is transformers' LlamaRotaryEmbedding."""
    torch = pytest.importorskip("torch", reason="needs torch (CPU)")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    from transformers.models.llama import modeling_llama

    S, H, D, theta = 12, 2, 8, 500.0
    config = transformers.LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D,
                                      rope_theta=theta, max_position_embeddings=S)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    x = np.random.default_rng(0).normal(size=(1, S, H, D)).astype(np.float32)
    xt = torch.from_numpy(x).transpose(1, 2)  # (B, H, S, D)
    cos, sin = rotary(xt, torch.arange(S)[None])
    ref, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    np.testing.assert_allclose(np.asarray(apply_rope(x, theta)),
                               ref.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


def test_tokenizers_exported(tmp_path, runs):
    """A bytes run gets a tokenizer.json whose ids are the bytes; a BPE run's own tokenizer
    (saved by train_and_evaluate in WORKDIR) is copied; AutoTokenizer loads both."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    text = "Of man's first ½ → ∞ disobedience"
    export_lib.export(runs["sp"], tmp_path / "bytes", check=False, log=lambda *_: None)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bytes"))
    ids = tok(text)["input_ids"]
    assert ids == [int(i) for i in data_lib.ByteTokenizer().encode(text)]
    assert tok.decode(ids) == text

    bpe_run = tiny_runs.train_tiny("sp", tmp_path / "bpe", data__tokenizer="bpe",
                                   data__vocab_size=300, train__steps=1)
    assert (bpe_run / "tokenizer.json").is_file()
    export_lib.export(bpe_run, tmp_path / "bpe_hf", check=False, log=lambda *_: None)
    assert (tmp_path / "bpe_hf" / "tokenizer.json").read_bytes() == (
        bpe_run / "tokenizer.json").read_bytes()
    ours = trained_run.load_tokenizer(bpe_run, trained_run.load(bpe_run).config)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bpe_hf"))
    assert tok(text)["input_ids"] == [int(i) for i in ours.encode(text)]


def test_nope_is_refused_before_writing(tmp_path):
    workdir = tiny_runs.train_tiny("umup", tmp_path, model__position="none", train__steps=1,
                                   model__depth=1)
    with pytest.raises(export_lib.ExportError, match="NoPE model has no Llama equivalent"):
        export_lib.export(workdir, tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_bad_input(tmp_path, runs):
    workdir = runs["sp"]
    before = _digest(workdir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(trained_run.RunReadError, match="has no checkpoints"):
        export_lib.export(tmp_path / "empty", tmp_path / "a", log=lambda *_: None)
    with pytest.raises(trained_run.RunReadError, match="does not exist"):
        export_lib.export(tmp_path / "nowhere", tmp_path / "a", log=lambda *_: None)
    with pytest.raises(trained_run.RunReadError,
                       match=r"--step=5 does not exist .*: the checkpoints are steps \[1, 2\]"):
        export_lib.export(workdir, tmp_path / "a", step=5, log=lambda *_: None)
    with pytest.raises(export_lib.ExportError, match="format='onnx' is invalid"):
        export_lib.export(workdir, tmp_path / "a", fmt="onnx", log=lambda *_: None)
    with pytest.raises(export_lib.ExportError, match="would hold the run directory"):
        export_lib.export(workdir, workdir.parent, overwrite=True, log=lambda *_: None)
    for inside in (workdir / "checkpoints", workdir / "hf"):  # --overwrite would delete it
        with pytest.raises(export_lib.ExportError, match="inside the run directory"):
            export_lib.export(workdir, inside, overwrite=True, log=lambda *_: None)
    assert _digest(workdir) == before
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(export_lib.ExportError, match="not empty.*--overwrite"):
        export_lib.export(workdir, out, log=lambda *_: None)
    assert (out / "keep.txt").read_text() == "mine"
    export_lib.export(workdir, out, step=1, overwrite=True, check=False, log=lambda *_: None)
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["umup_jax"]["step"] == 1
    assert _digest(workdir) == before


# A failed tensorstore read leaves orbax a callback onto its closed event loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["metadata", "data"])
def test_corrupt_checkpoint_is_named_and_left_alone(tmp_path, runs, damage):
    """Truncated JSON metadata or array data: the error names the damaged file; nothing in
    the run directory moves (unlike resuming, which sets unreadable checkpoints aside)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(runs["mup"], workdir)
    state = workdir / "checkpoints" / "2" / "state"
    manifest = workdir / "checkpoints" / "2" / "umup_manifest.json"
    if damage == "metadata":  # a checkpoint without a manifest (older runs): read and fail
        manifest.unlink()
    for f in state.rglob("*"):
        in_data = f.parent.name == "d"
        if (f.is_file() and f.stat().st_size > 0 and in_data == (damage == "data")
                and "ocdbt" not in f.name and f.suffix != ".txt"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate
    before = _digest(workdir)
    expected = (rf"checkpoint {re.escape(str(state))} is unreadable: "
                rf"{re.escape(str(state))}/.+ (is|are) damaged" if damage == "metadata" else
                rf"checkpoint step 2 of {re.escape(str(workdir))} is damaged: "
                rf"{re.escape(str(state))}/.+ has \d+ bytes, \d+ were written")
    with pytest.raises(trained_run.RunReadError, match=expected):
        export_lib.export(workdir, tmp_path / "out", log=lambda *_: None)
    assert _digest(workdir) == before and not (workdir / "checkpoints" / "corrupt").exists()
    assert not (tmp_path / "out").exists()
    # The earlier step still exports.
    result = export_lib.export(workdir, tmp_path / "out", step=1, check=False,
                               log=lambda *_: None)
    assert result["step"] == 1


def test_export_cli(tmp_path, runs):
    """The entry point's flags reach export (verification is covered in-process above)."""
    cmd = [sys.executable, "-m", "umup_jax.export", f"--workdir={runs['umup']}",
           f"--out={tmp_path / 'hf'}", "--step=1", "--noverify"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported step 1 of {runs['umup']}" in proc.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["umup_jax"]["step"] == 1
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "not empty" in again.stderr
    assert "--overwrite" in again.stderr
