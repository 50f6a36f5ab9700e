"""Data sources, tokenizers and the grain pipeline: determinism, resumable state, sharding."""

import json

import numpy as np
import pytest

from umup_jax import config as config_lib
from umup_jax import data as data_lib

TEXT = (
    "Of Man's first disobedience, and the fruit\n"
    "Of that forbidden tree whose mortal taste\n"
    "Brought death into the World, and all our woe,\n"
) * 200


@pytest.fixture
def text_files(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "train" / "b.txt").write_text(TEXT.upper(), encoding="utf-8")
    (tmp_path / "valid.txt").write_text(TEXT[:5000], encoding="utf-8")
    return tmp_path


def data_cfg(tmp_path, **kw):
    cfg = config_lib.base_config("umup").data
    cfg.source = "text"
    cfg.train_files = [str(tmp_path / "train" / "*.txt")]
    cfg.valid_files = [str(tmp_path / "valid.txt")]
    cfg.tokenizer = "bytes"
    cfg.cache_dir = str(tmp_path / "cache")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_byte_tokenizer_round_trip():
    tok = data_lib.ByteTokenizer()
    ids = tok.encode("Milton — Paradise")
    assert ids.max() < 256 and tok.decode(ids) == "Milton — Paradise"


def test_text_source_globs_and_caches(text_files):
    cfg = data_cfg(text_files)
    a = data_lib.load_tokens(cfg, cfg.cache_dir)
    b = data_lib.load_tokens(cfg, cfg.cache_dir)  # from the cache
    assert a.vocab_size == 256
    np.testing.assert_array_equal(a.train, b.train)
    assert len(a.train) == 2 * len(TEXT) + 2  # the glob matched a.txt and b.txt ("\n\n" between)
    assert list((text_files / "cache").glob("tokens-bytes-*.npy"))


def test_bpe_is_deterministic_and_cached(text_files, tmp_path):
    cfg = data_cfg(text_files, tokenizer="bpe", vocab_size=300)
    a = data_lib.load_tokens(cfg, str(tmp_path / "c1"))
    b = data_lib.load_tokens(cfg, str(tmp_path / "c2"))  # trained again from scratch
    assert a.vocab_size == b.vocab_size <= 300
    np.testing.assert_array_equal(a.train, b.train)
    assert len(a.train) < len(TEXT) * 3 / 1.5  # it merged something
    assert a.tokenizer.decode(a.valid[:40]) == TEXT[: len(a.tokenizer.decode(a.valid[:40]))]


def test_cached_tokens_and_a_saved_tokenizer_get_the_umasks_mode(text_files, tmp_path):
    """Written through a temporary file (0600 from mkstemp) and renamed: they still get the
    mode a plain write gives (0644 under umask 022, 0640 under 027), so another user's
    `sample`, `export` or sweep worker can read a run's tokenizer and a shared cache."""
    import os
    import stat

    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            cache = tmp_path / f"cache-{umask:o}"
            cfg = data_cfg(text_files, tokenizer="bpe", vocab_size=300)
            tokens = data_lib.load_tokens(cfg, str(cache))
            tokens.tokenizer.save(tmp_path / f"tokenizer-{umask:o}.json")
        finally:
            os.umask(old)
        written = [p for p in cache.rglob("*") if p.is_file()]
        written.append(tmp_path / f"tokenizer-{umask:o}.json")
        assert len(written) >= 3  # the BPE, the token arrays and the saved tokenizer
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
            p.name: oct(0o666 & ~umask) for p in written}


def test_memmap_source(tmp_path):
    arr = (np.arange(10_000) % 1000).astype(np.uint16)
    arr.tofile(tmp_path / "train.bin")
    arr[:3000].tofile(tmp_path / "valid.bin")
    cfg = config_lib.base_config("umup").data
    cfg.source, cfg.train_bin, cfg.valid_bin, cfg.vocab_size = (
        "memmap", str(tmp_path / "train.bin"), str(tmp_path / "valid.bin"), 1000)
    data = data_lib.load_tokens(cfg, str(tmp_path))
    np.testing.assert_array_equal(data.train, arr)
    cfg.vocab_size = 500
    with pytest.raises(ValueError, match="data.vocab_size=500 is too small"):
        data_lib.load_tokens(cfg, str(tmp_path))
    cfg.vocab_size = 1000
    # Validation tokens that are the training tokens: the same file, or the same bytes.
    cfg.valid_bin = cfg.train_bin
    with pytest.raises(data_lib.DataConfigError,
                       match=r"data.valid_bin overlap data.train_bin: .*train\.bin"):
        data_lib.load_tokens(cfg, str(tmp_path))
    arr.tofile(tmp_path / "copy.bin")
    cfg.valid_bin = str(tmp_path / "copy.bin")
    with pytest.raises(data_lib.DataConfigError, match=r"copy\.bin \(same bytes as .*train"):
        data_lib.load_tokens(cfg, str(tmp_path))


def test_a_hugging_face_validation_split_that_is_the_training_split_is_refused(tmp_path):
    cfg = config_lib.base_config("umup").data
    cfg.source, cfg.hf_name, cfg.hf_train_split, cfg.hf_valid_split = (
        "hf", "some/dataset", "train", "train")
    with pytest.raises(data_lib.DataConfigError,
                       match=r"data.hf_valid_split='train' is the training split"):
        data_lib.load_tokens(cfg, str(tmp_path))  # before any dataset is opened
    data_lib.check_distinct_splits("train[:99%]", "train[99%:]", "a", "b")  # slices pass


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(train_files=["/nonexistent/*.txt"]), "data.train_files: no file matches"),
        (dict(tokenizer="sentencepiece"), "data.tokenizer='sentencepiece' is invalid"),
        (dict(tokenizer="/nonexistent/tokenizer.json"), "does not exist"),
        (dict(source="s3"), "data.source='s3' is invalid"),
    ],
)
def test_bad_data_settings_name_the_field(text_files, changes, match):
    with pytest.raises(ValueError, match=match):
        data_lib.load_tokens(data_cfg(text_files, **changes))


def test_missing_bundled_dir_names_the_field(tmp_path):
    cfg = config_lib.base_config("umup").data
    cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data.data_dir"):
        data_lib.load_tokens(cfg, str(tmp_path))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_pipeline_deterministic_and_resumable():
    tokens = np.arange(5000, dtype=np.uint16)
    ds = data_lib.train_dataset(tokens, seq_len=16, batch_size=8, seed=3)
    first = _take(iter(ds), 40)  # > 1 epoch (312 windows / 8 = 39 batches)
    again = _take(iter(ds), 40)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    it = iter(ds)
    _take(it, 17)
    state = json.loads(json.dumps(it.get_state()))  # survives JSON (the checkpoint format)
    resumed = iter(data_lib.train_dataset(tokens, seq_len=16, batch_size=8, seed=3))
    resumed.set_state(state)
    for a, b in zip(first[17:], _take(resumed, 23)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    # Targets are inputs shifted by one token; windows are contiguous text.
    b = first[0]
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert np.all(np.diff(b["inputs"], axis=1) == 1)
    # A different seed gives a different order.
    other = _take(iter(data_lib.train_dataset(tokens, 16, 8, seed=4)), 1)[0]
    assert not np.array_equal(other["inputs"], first[0]["inputs"])
    # Epochs are reshuffled: epoch 2 visits every window again, in another order.
    window_starts = lambda batches: [int(r[0]) for b in batches for r in b["inputs"]]
    n_windows = (5000 - 1) // 16
    ds = data_lib.train_dataset(tokens, seq_len=16, batch_size=1, seed=3)
    it = iter(ds)
    epoch1 = window_starts(_take(it, n_windows))
    epoch2 = window_starts(_take(it, n_windows))
    assert sorted(epoch1) == sorted(epoch2) == [16 * i for i in range(n_windows)]
    assert epoch1 != epoch2


def test_process_shards_are_disjoint_and_cover_the_global_batch():
    tokens = np.arange(4000, dtype=np.uint16)
    whole = _take(iter(data_lib.train_dataset(tokens, 16, 8, seed=1)), 5)
    parts = [_take(iter(data_lib.train_dataset(tokens, 16, 8, seed=1, process_index=p,
                                               process_count=2)), 5) for p in range(2)]
    for step in range(5):
        rows = np.concatenate([parts[0][step]["inputs"], parts[1][step]["inputs"]])
        assert rows.shape == whole[step]["inputs"].shape
        starts0 = set(parts[0][step]["inputs"][:, 0].tolist())
        starts1 = set(parts[1][step]["inputs"][:, 0].tolist())
        assert not starts0 & starts1
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data_lib.train_dataset(tokens, 16, 8, seed=1, process_count=3)


def test_prefetcher_returns_state_before_each_batch():
    tokens = np.arange(3000, dtype=np.uint16)
    ds = data_lib.train_dataset(tokens, 16, 4, seed=0)
    reference = _take(iter(ds), 6)
    pf = data_lib.Prefetcher(iter(ds), depth=3)
    got = [pf.next() for _ in range(6)]
    pf.close()
    for (state, batch), ref in zip(got, reference):
        np.testing.assert_array_equal(batch["inputs"], ref["inputs"])
    it = iter(ds)
    it.set_state(got[4][0])
    np.testing.assert_array_equal(next(it)["inputs"], reference[4]["inputs"])


def test_seq_len_longer_than_data_raises():
    with pytest.raises(ValueError, match="model.seq_len=64 is longer than the training data"):
        data_lib.train_dataset(np.arange(30, dtype=np.uint16), 64, 2, seed=0)


def test_epochs_covered():
    assert data_lib.epochs_covered(np.zeros(1601), 16, 10, 20) == pytest.approx(2.0)


def test_windows_need_seq_len_plus_one_tokens():
    """A window is seq_len + 1 tokens (inputs and the targets one token on): 4992 = 16·312
    tokens hold 311 full windows, not 312 (the 312th would lack its last target)."""
    tokens = np.arange(16 * 312, dtype=np.uint16)
    assert data_lib.num_windows(tokens, 16) == 311
    assert data_lib.num_windows(tokens[:-1], 16) == 311 and data_lib.num_windows(
        np.arange(16 * 312 + 1), 16) == 312
    assert data_lib.epochs_covered(tokens, 16, 311, 2) == pytest.approx(2.0)
    ds = data_lib.train_dataset(tokens, seq_len=16, batch_size=311, seed=0)
    batch = _take(iter(ds), 1)[0]  # one whole epoch: every window full length
    assert batch["inputs"].shape == batch["targets"].shape == (311, 16)
    assert sorted(batch["inputs"][:, 0].tolist()) == [16 * i for i in range(311)]
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)


def test_eval_batches_are_fixed_in_order_and_split_across_processes():
    """The validation batches: windows in file order (no shuffle), min(max_batches,
    windows // batch) of them, each process its own contiguous slice of every global batch."""
    tokens = np.arange(16 * 10 + 1, dtype=np.uint16)  # 10 windows of 16 + 1 tokens
    whole = data_lib.eval_batches(tokens, 16, 4, max_batches=5)
    assert len(whole) == 2  # 10 // 4: the 2 windows left over are not evaluated
    assert [b["inputs"][:, 0].tolist() for b in whole] == [[0, 16, 32, 48], [64, 80, 96, 112]]
    for b in whole:
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
    assert len(data_lib.eval_batches(tokens, 16, 4, max_batches=1)) == 1
    parts = [data_lib.eval_batches(tokens, 16, 4, 5, process_index=p, process_count=2)
             for p in range(2)]
    for i, b in enumerate(whole):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][i]["inputs"], parts[1][i]["inputs"]]), b["inputs"])
    with pytest.raises(ValueError, match="fewer than one batch of train.eval_batch_size=11"):
        data_lib.eval_batches(tokens, 16, 11, 1)
