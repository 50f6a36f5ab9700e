"""Sampling from a trained run: deterministic for a seed, greedy decoding of a memorised
string, a sliding window past the training length, one compiled forward, bad input."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_runs
from umup_jax import sample as sample_lib
from umup_jax import trained_run

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEMO = "the quick brown fox jumps over the lazy dog; "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_runs.shared_run(tmp_path_factory, "umup", **tiny_runs.UMUP_LAYOUT)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny u-μP model overfitted on one sentence repeated (S = 32 bytes).  200 steps: after
    120, jax 0.12's numerics left one ambiguous byte ("fox ju" went on as in "quick").  η = 2:
    at η = 4 greedy decoding went astray after 26-35 bytes on jax 0.12.1 (train loss 0.057)
    and, at 300 steps, on 0.10.2; η = 1, 2 memorised it at 200 and 300 steps on both."""
    base = tmp_path_factory.mktemp("memo")
    path = tiny_runs.text_file(base, MEMO, repeat=200)
    cfg = tiny_runs.tiny_config(
        "umup", base, path, model__width=64, model__depth=1, model__num_heads=2,
        train__steps=200, train__batch_size=8, train__checkpoint_every=200,
        train__eval_every=200, optimizer__warmup_steps=10, optimizer__learning_rate=2.0)
    from umup_jax import train as train_lib

    results = train_lib.train_and_evaluate(cfg, str(base / "run"))
    return base / "run", results


def test_same_seed_same_text_other_seed_other_text(run):
    r = trained_run.load(run)
    prompt = [int(i) for i in b"Now is the"]
    a = sample_lib.generate(r, prompt, 24, temperature=1.0, seed=3)
    b = sample_lib.generate(r, prompt, 24, temperature=1.0, seed=3)
    c = sample_lib.generate(r, prompt, 24, temperature=1.0, seed=4)
    assert a == b and a != c and len(a) == 24
    # top_k = 1 is greedy whatever the temperature and seed.
    greedy = sample_lib.generate(r, prompt, 24, temperature=0.0)
    assert sample_lib.generate(r, prompt, 24, temperature=2.0, top_k=1, seed=9) == greedy


def test_greedy_is_the_argmax_of_the_model_and_slides_past_the_training_length(run):
    """Greedy tokens equal the argmax of our forward over the last ≤ S tokens (padded to S),
    for a generation longer than S (the window slides)."""
    r = trained_run.load(run)
    S = r.model_cfg.seq_len
    prompt = [int(i) for i in b"Of man's first disobedience"]
    new = sample_lib.generate(r, prompt, S + 5, temperature=0.0)
    assert len(new) == S + 5
    ids = prompt + new
    forward = jax.jit(r.model.apply)
    for t in (0, S - len(prompt), S + 4):  # first token, window full, window slid
        window = ids[: len(prompt) + t][-S:]
        buffer = np.zeros((1, S), np.int32)
        buffer[0, : len(window)] = window
        logits = np.asarray(forward(r.params, buffer))[0, len(window) - 1]
        assert new[t] == int(np.argmax(logits))


def test_greedy_reproduces_a_memorised_string(memorised):
    workdir, results = memorised
    assert results["final_train_loss"] < 0.25, results["final_train_loss"]  # overfitted
    text, info = sample_lib.sample_text(workdir, "the quick", max_new_tokens=60,
                                        temperature=0.0)
    assert text == ("the quick" + (MEMO * 3)[len("the quick"):])[: len("the quick") + 60]
    assert info["prompt_tokens"] == 9 and len(info["new_tokens"]) == 60


def test_bad_input(tmp_path, run):
    r = trained_run.load(run)
    with pytest.raises(ValueError, match="--prompt is empty"):
        sample_lib.generate(r, [], 5)
    with pytest.raises(ValueError, match="--temperature=-1.0 is invalid"):
        sample_lib.generate(r, [1], 5, temperature=-1.0)
    with pytest.raises(ValueError, match=r"--top_k=300 is invalid: it must be an integer in "
                                         r"\[0, 256\]"):
        sample_lib.generate(r, [1], 5, top_k=300)
    with pytest.raises(trained_run.RunReadError, match="has no checkpoints"):
        sample_lib.sample_text(tmp_path, "x")
    with pytest.raises(trained_run.RunReadError, match=r"the checkpoints are steps \[1, 2\]"):
        sample_lib.sample_text(run, "x", step=7)
    # A non-byte run without its tokenizer.json: a clear message, nothing guessed.
    config = r.config
    config.data.tokenizer = "bpe"
    with pytest.raises(trained_run.RunReadError, match="has no tokenizer.json"):
        trained_run.load_tokenizer(tmp_path, config)


def test_sample_cli(run):
    cmd = [sys.executable, "-m", "umup_jax.sample", f"--workdir={run}", "--prompt=Now is",
           "--max_new_tokens=12", "--seed=5", "--temperature=1.0"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("Now is") and "step 2 of" in first.stderr
    r = trained_run.load(run)
    new = sample_lib.generate(r, [int(i) for i in b"Now is"], 12, temperature=1.0, seed=5)
    assert first.stdout[:-1] == (b"Now is" + bytes(new)).decode("utf-8", errors="replace")
    bad = subprocess.run(cmd[:4] + ["--prompt="], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "--prompt is empty" in bad.stderr


def test_transformers_greedy_generate_matches_ours(memorised, tmp_path):
    """The exported model, run by transformers' own generate (KV cache, growing lengths),
    continues the prompt exactly as our sampler does."""
    torch = pytest.importorskip("torch", reason="needs torch (CPU)")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    pytest.importorskip("safetensors", reason="export writes safetensors (the `export` extra)")
    from umup_jax import export as export_lib

    workdir, _ = memorised
    export_lib.export(workdir, tmp_path / "hf", check=False, log=lambda *_: None)
    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    prompt = "over the"
    ids = tok(prompt, return_tensors="pt").input_ids
    n_new = 32 - ids.shape[1]  # stay within the training length S = 32
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    ours = sample_lib.generate(trained_run.load(workdir), ids[0].tolist(), n_new,
                               temperature=0.0)
    assert hf[0, ids.shape[1]:].tolist() == ours
    assert tok.decode(hf[0]) == (MEMO * 3)[MEMO.index(prompt):][:32]
