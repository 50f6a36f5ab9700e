"""prepare_data and the prepared / hf sources: exact tokens with document separators, checks of
a prepared directory against its meta.json, refusals, bad input, Hugging Face datasets built
locally, and bit-exact resume of a run on prepared data."""

import json
import os
import pathlib
import random
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import prepare_data as P
from umup_jax import train as train_lib
from umup_jax.data import DataConfigError
from umup_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEP = "\n\x0c\n"

POEM = ("Of Man's first disobedience, and the fruit\n"
        "Of that forbidden tree whose mortal taste\n"
        "Brought death into the World, and all our woe,\n")
# Documents with non-ASCII text, a literal separator string (ordinary text inside a document),
# characters on which `regex` and tokenizers' engine disagree (U+0558), and blank lines.
TRAIN_DOCS = {
    "a.txt": [POEM * 30, "Café — naïve “quotes” 😀 ١٢٣ Ⅻ\n\n  indented\n" * 20,
              "literal <|endoftext|> inside\n" + POEM * 5, "  \n", "Armenian \u0558 end\n" * 3],
    "b.txt": [POEM.upper() * 20, "short"],
}
VALID_DOCS = [POEM * 8, "Paradise regained.\n" * 20]


def write_docs(path: pathlib.Path, docs) -> None:
    path.write_text(SEP.join(docs), encoding="utf-8")


def kept(docs):
    return [d for d in docs if d.strip()]  # whitespace-only documents are skipped


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, docs in TRAIN_DOCS.items():
        write_docs(root / name, docs)
    (root / "valid").mkdir()
    write_docs(root / "valid" / "v.txt", VALID_DOCS)
    return root


def sources(corpus, **kw):
    return (P.TextFiles([str(corpus / "*.txt")], field="--train_files", **kw),
            P.TextFiles([str(corpus / "valid" / "v.txt")], field="--valid_files", **kw))


def train_docs():
    return [d for name in sorted(TRAIN_DOCS) for d in kept(TRAIN_DOCS[name])]


def expected_ids(tok: tokenizers.Tokenizer, docs, eos_id):
    tok.encode_special_tokens = True  # a document's text is ordinary text
    ids = []
    for doc in docs:
        ids += tok.encode(doc, add_special_tokens=False).ids + [eos_id]
    return np.array(ids)


@pytest.fixture
def prepared_bpe(corpus, tmp_path):
    out = tmp_path / "bpe"
    meta = P.prepare(*sources(corpus), "bpe:320", out, command="test")
    return out, meta


def test_bpe_round_trip_equals_direct_encode_with_separators(prepared_bpe):
    out, meta = prepared_bpe
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert (meta["vocab_size"], meta["dtype"], meta["eos_id"], eos) == (320, "uint16", 0, 0)
    docs = {"train": train_docs(), "valid": kept(VALID_DOCS)}
    for split in ("train", "valid"):
        got = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        np.testing.assert_array_equal(got, expected_ids(tok, docs[split], eos))
        # One separator after each document and nowhere else (the literal string is text).
        ends = np.cumsum([len(tok.encode(d).ids) + 1 for d in docs[split]]) - 1
        np.testing.assert_array_equal(np.flatnonzero(got == eos), ends)
        assert meta["splits"][split]["tokens"] == len(got)
        assert meta["splits"][split]["documents"] == len(docs[split])
    assert meta["documents"] == 6 + 2  # "  \n" is skipped
    assert meta["tokenizer"]["sha256"] == data_lib.sha256_file(out / "tokenizer.json")
    assert meta["tokenizer"]["bpe_sample"]["rate"] == 1.0  # the corpus is below the bound
    assert meta["command"] == "test" and meta["source"]["train"]["files"] == 2
    assert not list(out.parent.glob(".bpe.tmp-*"))
    # data.source=prepared: the same tokens, memory-mapped, and the vocabulary from meta.json.
    cfg = config_lib.proxy_config("umup", f"data.source=prepared,data.prepared_dir={out}").data
    tokens = data_lib.load_tokens(cfg)
    assert tokens.vocab_size == 320 and isinstance(tokens.train, np.memmap)
    np.testing.assert_array_equal(tokens.valid, np.fromfile(out / "valid.bin", np.uint16))
    first = tokens.tokenizer.decode(tokens.train[: int(np.argmax(tokens.train == eos))])
    assert first == docs["train"][0]


@pytest.mark.parametrize("fork", [True, False])
def test_workers_small_reads_and_pieces_give_identical_bins(prepared_bpe, corpus, tmp_path,
                                                            monkeypatch, fork):
    out, _ = prepared_bpe
    monkeypatch.setattr(P, "fork_is_safe", lambda: fork)
    monkeypatch.setattr(P, "_READ_CHARS", 7)  # separators straddle reads
    monkeypatch.setattr(P, "CHUNK_CHARS", 500)  # many chunks in flight
    other = tmp_path / "other"
    meta = P.prepare(*sources(corpus, piece_chars=60), str(out / "tokenizer.json"), other,
                     workers=2)
    assert meta["start_method"] == ("fork" if fork else "spawn")
    for name in ("train.bin", "valid.bin", "tokenizer.json"):
        assert (other / name).read_bytes() == (out / name).read_bytes(), name


def test_bytes_tokenizer_ids_are_utf8_bytes_and_eos_256(corpus, tmp_path):
    out = tmp_path / "bytes"
    meta = P.prepare(*sources(corpus), "bytes", out)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (257, 256, "uint16")
    want = b"".join(d.encode("utf-8") + b"\x00" for d in kept(VALID_DOCS))
    want = np.frombuffer(want, np.uint8).astype(np.uint16)
    want[want == 0] = 256
    np.testing.assert_array_equal(np.fromfile(out / "valid.bin", np.uint16), want)
    # tokenizer.json is a real tokenizers file that gives the same ids.
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Café 😀 \u0558 <x>\n\t"
    assert tok.encode(text).ids == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text


def test_fast_encoder_matches_tokenizers_on_mixed_unicode(prepared_bpe):
    out, _ = prepared_bpe
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = P.ByteLevelBPEEncoder(tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")))
    tok.encode_special_tokens = True
    rng = random.Random(1472)
    pools = [list("abcXYZ019 \n\t\r\x0b\x0c\x1c\x1f.,;:'!?\"-()"),
             [chr(c) for c in range(0x80, 0x800)], [chr(c) for c in range(0x3000, 0x3100)],
             ["\u0558", "\U00010940", "\u208f", "\u2003", "\xa0", "\x85", "é", "😀", "١", "Ⅻ"],
             ["'s", "'re", " 's", "<|endoftext|>", "  ", "\n\n", " \n"]]
    for _ in range(400):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 60)))
        assert enc.encode(text) == tok.encode(text, add_special_tokens=False).ids, repr(text)
    assert "\u0558" in enc._disagree and enc._ascii is not None


def test_cut_points_keep_the_ids_of_the_whole_document(prepared_bpe):
    out, _ = prepared_bpe
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    doc = ("word  \n\n  spaced out,\tlines\n" * 40 + "Ünïcode  ending\n") * 3
    whole = tok.encode(doc).ids
    pieces = list(P.split_document(doc, limit=37))
    assert len(pieces) > 10 and [end for _, end in pieces].count(True) == 1
    assert "".join(p for p, _ in pieces) == doc
    assert sum((tok.encode(p).ids for p, _ in pieces), []) == whole


def test_prepared_dir_mismatches_fail_naming_the_file(prepared_bpe, tmp_path):
    out, _ = prepared_bpe

    def broken(edit):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        edit(copy)
        return copy

    def set_meta(key, value):
        def edit(d):
            meta = json.loads((d / "meta.json").read_text())
            meta[key] = value
            (d / "meta.json").write_text(json.dumps(meta))
        return edit

    cases = [
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-2]),
         r"train\.bin: .* bytes, but meta.json says"),
        (set_meta("dtype", "uint32"), r"train\.bin: .* uint32 tokens"),
        (set_meta("vocab_size", 70000), "vocab_size 70000 does not fit dtype uint16"),
        # tokenizer.json untouched (its sha256 matches): only its token count disagrees.
        (set_meta("vocab_size", 321), r"tokenizer\.json: 320 tokens, but meta.json says "
                                      "vocab_size 321"),
        (lambda d: (d / "tokenizer.json").write_text(
            (d / "tokenizer.json").read_text().replace('"Of"', '"Og"')),
         r"tokenizer\.json: sha256 .* does not match meta.json"),
        (lambda d: (d / "valid.bin").unlink(), r"valid\.bin is missing"),
        (set_meta("format", "nanogpt"), "format 'nanogpt' is not"),
    ]
    for edit, match in cases:
        with pytest.raises(DataConfigError, match=match):
            data_lib.load_prepared(broken(edit))
    with pytest.raises(DataConfigError, match="does not exist.*python -m umup_jax.prepare_data"):
        data_lib.load_prepared(tmp_path / "nowhere")


def test_existing_out_is_refused_unless_overwrite(prepared_bpe, corpus, tmp_path):
    out, meta = prepared_bpe
    with pytest.raises(DataConfigError, match="exists .*pass --overwrite"):
        P.prepare(*sources(corpus), "bytes", out)
    assert json.loads((out / "meta.json").read_text()) == meta  # untouched
    new = P.prepare(*sources(corpus), "bytes", out, overwrite=True)
    assert new["vocab_size"] == 257 == json.loads((out / "meta.json").read_text())["vocab_size"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataConfigError, match=r"does not write \(notes.txt\)"):
        P.prepare(*sources(corpus), "bytes", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"text\x00\x01\x02 more", "contains NUL bytes"),
    (b"caf\xe9 latin-1", "is not UTF-8 text"),
])
def test_bad_files_fail_naming_them_and_leave_no_dir(corpus, tmp_path, content, match):
    (corpus / "bad.txt").write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataConfigError, match=rf"--train_files: .*bad\.txt {match}"):
        P.prepare(*sources(corpus), "bpe:300", out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_settings_fail_before_any_work(corpus, tmp_path):
    train, valid = sources(corpus)
    out = tmp_path / "out"
    with pytest.raises(DataConfigError, match=r"--train_files: no file matches '.*nothing\*'"):
        P.prepare(P.TextFiles([str(corpus / "nothing*")]), valid, "bytes", out)
    with pytest.raises(DataConfigError, match="--tokenizer='bpe:100' is invalid"):
        P.prepare(train, valid, "bpe:100", out)
    with pytest.raises(DataConfigError, match="--tokenizer='sentencepiece' is invalid"):
        P.prepare(train, valid, "sentencepiece", out)
    with pytest.raises(DataConfigError, match="share 1 file"):
        P.check_disjoint_files(train, P.TextFiles([str(corpus / "a.txt")]))
    assert not out.exists()


def test_failure_after_train_bin_is_written_leaves_nothing(corpus, tmp_path, monkeypatch):
    # bytes: no BPE sample is read, so the bad valid file fails only while valid.bin is written.
    (corpus / "valid" / "v.txt").write_bytes(b"caf\xe9 latin-1")
    written = []
    write_split = P.write_split

    def recording(pool, source, path, *args):
        if path.name == "valid.bin":
            written.append((path.parent, (path.parent / "train.bin").stat().st_size))
        return write_split(pool, source, path, *args)

    monkeypatch.setattr(P, "write_split", recording)
    out = tmp_path / "out"
    with pytest.raises(DataConfigError, match=r"--valid_files: .*v\.txt is not UTF-8 text"):
        P.prepare(*sources(corpus), "bytes", out)
    [(tmp, train_bytes)] = written
    assert tmp.name.startswith(".out.tmp-") and train_bytes > 0  # train.bin was written
    assert not out.exists() and not tmp.exists() and not list(tmp_path.glob(".out.*"))


def test_tokenizer_with_gaps_in_its_ids_is_refused_naming_it(corpus, tmp_path):
    # Two tokens with ids 0 and 5: get_vocab_size() is 2, so id 5 would index past the
    # embedding (and an added EOS would get id 2).
    gaps = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 5}, unk_token="a"))
    gaps.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    gaps.save(str(tmp_path / "gaps.json"))
    assert gaps.get_vocab_size() == 2 and gaps.encode("b").ids == [5]
    out = tmp_path / "out"
    with pytest.raises(DataConfigError, match=r"--tokenizer: .*gaps\.json has 2 tokens but "
                                              r"ids up to 5"):
        P.prepare(*sources(corpus), str(tmp_path / "gaps.json"), out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_vocabulary_beyond_uint16_is_written_as_uint32(corpus, tmp_path):
    vocab = {ch: b for b, ch in data_lib.bytes_to_unicode().items()}
    vocab.update({f"<unused{i}>": 256 + i for i in range(70_000)})
    big = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = tokenizers.decoders.ByteLevel()
    big.save(str(tmp_path / "big.json"))
    out = tmp_path / "wide"
    meta = P.prepare(*sources(corpus), str(tmp_path / "big.json"), out)
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"]) == ("uint32", 70_257, 70_256)
    assert meta["tokenizer"]["eos_added"]
    valid = np.fromfile(out / "valid.bin", np.uint32)
    assert valid[-1] == 70_256 and (valid == 70_256).sum() == 2  # not wrapped to 4720
    tokens = data_lib.load_prepared(out)
    assert tokens.train.dtype == np.uint32 and tokens.vocab_size == 70_257


def test_bpe_sample_is_bounded_spread_and_deterministic(corpus):
    train, _ = sources(corpus)
    size = train.size_estimate()
    texts, info = P.bpe_sample(train, size // 3, "spread")
    again, _ = P.bpe_sample(train, size // 3, "spread")
    assert texts == again and info["rate"] == pytest.approx(1 / 3, rel=0.01)
    assert sum(map(len, texts)) < size // 3 + max(map(len, train_docs()))
    head, head_info = P.bpe_sample(train, size // 3, "head")
    assert head_info["rate"] == 1.0 and head[0] == train_docs()[0]


def test_wikitext_rows_become_articles():
    rows = ["", " = Valkyria = \n", "", " Senjō no Valkyria .\n", " = = Gameplay = = \n",
            " Play .\n", "", " = Tower Building = \n", " A tower .\n"]
    assert [P.is_wikitext_heading(r) for r in rows[:5]] == [False, True, False, False, False]
    split = P.HFSplit({"train": FakeDataset(rows)}, "train", documents_mode="wikitext")
    docs = [p for p, _ in split.documents()]
    assert docs == ["\n = Valkyria = \n\n Senjō no Valkyria .\n = = Gameplay = = \n Play .\n\n",
                    " = Tower Building = \n A tower .\n"]


class FakeDataset:
    column_names = ["text"]

    def __init__(self, rows):
        self.rows = rows

    def iter(self, batch_size):
        for i in range(0, len(self.rows), batch_size):
            yield {"text": self.rows[i : i + batch_size]}


ROWS = {"train": [POEM * 3, "", "Café row 😀\n", "  ", POEM.upper()] * 4,
        "validation": [POEM, "Paradise.\n" * 9, ""] * 2}


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """`datasets`, offline, with its cache (of non-streamed loads) under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def write_parquet(datasets, root: pathlib.Path, files: dict) -> pathlib.Path:
    """A local dataset of parquet files: {file name (its split's name first): columns}."""
    root.mkdir(parents=True)
    for name, columns in files.items():
        datasets.Dataset.from_dict(columns).to_parquet(str(root / f"{name}.parquet"))
    return root


def hf_config(name, **overrides):
    cfg = config_lib.proxy_config("umup", f"data.source=hf,data.hf_name={name},"
                                  "data.tokenizer=bytes").data
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_hf_local_dataset_through_prepare_data_and_source_hf(tmp_path, hf_datasets):
    datasets = hf_datasets
    parquet = write_parquet(datasets, tmp_path / "parquet",
                            {split: {"text": rows} for split, rows in ROWS.items()})
    # prepare_data: streams the parquet files.
    splits = P.open_hf(str(parquet), streaming=True)
    train = P.HFSplit(splits, "train", name=str(parquet))
    valid = P.HFSplit(splits, "validation", split_field="--hf_valid_split", name=str(parquet))
    meta = P.prepare(train, valid, "bytes", tmp_path / "out")
    want = b"".join(r.encode() + b"\x00" for r in ROWS["train"] if r.strip())
    want = np.frombuffer(want, np.uint8).astype(np.uint16)
    want[want == 0] = 256
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "train.bin", np.uint16), want)
    assert meta["splits"]["train"]["documents"] == 12 and meta["source"]["kind"] == "hf"
    # data.source=hf: a save_to_disk directory, prepared into the cache, the same tokens.
    disk = tmp_path / "disk"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r})
                          for s, r in ROWS.items()}).save_to_disk(str(disk))
    cfg = config_lib.proxy_config("umup", f"data.source=hf,data.hf_name={disk},"
                                  "data.tokenizer=bytes").data
    cache = tmp_path / "cache"
    # prepare=False (a finished run's token check) refuses to prepare it, writing nothing.
    with pytest.raises(DataConfigError, match=r"is not prepared in .*\(prepare=False\)"):
        data_lib.load_tokens(cfg, str(cache), prepare=False)
    assert not (cache / "prepared").exists() or not list((cache / "prepared").iterdir())
    tokens = data_lib.load_tokens(cfg, str(cache))
    np.testing.assert_array_equal(tokens.train, want)
    at_hand = data_lib.load_tokens(cfg, str(cache), prepare=False)
    assert at_hand.fingerprint == tokens.fingerprint
    assert tokens.vocab_size == 257 and len(list((cache / "prepared").iterdir())) == 1
    again = data_lib.load_tokens(cfg, str(cache))  # from the cache
    np.testing.assert_array_equal(again.valid, tokens.valid)
    # A BPE through data.source=hf matches its tokenizer's direct encoding too.
    cfg.tokenizer, cfg.vocab_size = "bpe", 300
    bpe = data_lib.load_tokens(cfg, str(cache))
    tok = bpe.tokenizer.hf
    np.testing.assert_array_equal(
        bpe.valid, expected_ids(tok, [r for r in ROWS["validation"] if r.strip()], 0))
    # Missing split, missing field: the message names the key and what exists.
    cfg.hf_valid_split = "test"
    with pytest.raises(DataConfigError, match=r"data.hf_valid_split='test'.*\['train', "
                                              r"'validation'\]"):
        data_lib.load_tokens(cfg, str(cache))
    cfg.hf_valid_split, cfg.hf_text_field = "validation", "content"
    with pytest.raises(DataConfigError, match=r"data.hf_text_field='content' is not a column"):
        data_lib.load_tokens(cfg, str(cache))
    # data.source=hf on the parquet files, streamed and downloaded (separate caches): the same
    # bins, under the same cache key (streaming is not part of the data's identity).
    got = {}
    for streaming in (True, False):
        cache = tmp_path / f"cache-{streaming}"
        tokens = data_lib.load_tokens(hf_config(parquet, hf_streaming=streaming), str(cache))
        [entry] = (cache / "prepared").iterdir()
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["source"]["train"]["streaming"] is streaming
        got[streaming] = entry.name, np.asarray(tokens.train), np.asarray(tokens.valid)
    assert got[True][0] == got[False][0]
    np.testing.assert_array_equal(got[True][1], want)
    for a, b in zip(got[True][1:], got[False][1:]):
        np.testing.assert_array_equal(a, b)
    # The entry made streaming serves a downloaded run, without preparing again.
    data_lib.load_tokens(hf_config(parquet, hf_streaming=False), str(tmp_path / "cache-True"))
    assert len(list((tmp_path / "cache-True" / "prepared").iterdir())) == 1
    # Changed data files change the identity (no stale cache entry is used).
    before = P.hf_data_identity(str(parquet))
    datasets.Dataset.from_dict({"text": ["new"]}).to_parquet(str(parquet / "train.parquet"))
    stat = (parquet / "train.parquet").stat()
    os.utime(parquet / "train.parquet", (stat.st_atime, stat.st_mtime + 10))
    assert P.hf_data_identity(str(parquet)) != before


def test_streamed_hf_missing_text_field_names_the_field_and_dataset(tmp_path, hf_datasets):
    datasets = hf_datasets
    # No such column: found from the stream's columns before any row is read.
    body = write_parquet(datasets, tmp_path / "body",
                         {"train": {"body": ["x"]}, "validation": {"body": ["y"]}})
    with pytest.raises(DataConfigError, match=rf"data.hf_text_field='text' is not a column of "
                                              rf"{body}/train \(columns: \['body'\]\)"):
        data_lib.load_tokens(hf_config(body), str(tmp_path / "cache"))
    # A later file of the split lacks it: the stream fails while reading that file.
    mixed = write_parquet(datasets, tmp_path / "mixed" / "data",
                          {"train-00000": {"text": ["a b"]}, "train-00001": {"body": ["c"]},
                           "validation-00000": {"text": ["v"]}}).parent
    with pytest.raises(DataConfigError, match=rf"data.hf_text_field='text': a file of "
                                              rf"{mixed}/train has the columns \['body'\]"):
        data_lib.load_tokens(hf_config(mixed), str(tmp_path / "cache"))
    # A stream that does not know its columns (column_names None) is checked per batch.
    splits = P.open_hf(str(body), streaming=True)
    mapped = {s: d.map(lambda row: {"content": "z"}, remove_columns=["body"])
              for s, d in splits.items()}
    split = P.HFSplit(mapped, "validation", name="mapped", prefix="data.")
    split.check()
    assert split.dataset.column_names is None
    with pytest.raises(DataConfigError, match=r"data.hf_text_field='text' is not a column of "
                                              r"mapped/validation \(columns: \['content'\]\)"):
        list(split.documents())
    assert not list((tmp_path / "cache" / "prepared").iterdir())  # no entry left behind


def test_empty_hf_split_names_the_dataset(tmp_path, hf_datasets):
    empty = write_parquet(hf_datasets, tmp_path / "empty",
                          {"train": {"text": ["", "  \n", None]},
                           "validation": {"text": ["v"]}})
    cache = str(tmp_path / "cache")
    with pytest.raises(DataConfigError, match=rf"the train split \({empty}/train\) has no "
                                              "documents with text"):
        data_lib.load_tokens(hf_config(empty), cache)
    with pytest.raises(DataConfigError, match=rf"the train split \({empty}/train\) has no text "
                                              "to train the BPE on"):
        data_lib.load_tokens(hf_config(empty, tokenizer="bpe", vocab_size=300), cache)


def test_hf_source_no_longer_forces_offline_mode():
    source = (ROOT / "umup_jax" / "data.py").read_text()
    assert "HF_DATASETS_OFFLINE\", \"1\"" not in source
    assert "setdefault(\"HF_DATASETS_OFFLINE\"" not in source


def test_wikitext103_variant_names_the_command_that_makes_its_data(tmp_path):
    cfg = config_lib.proxy_config("umup", f"wikitext103,data.prepared_dir={tmp_path / 'wt'}")
    assert cfg.data.source == "prepared" and "bpe:32000" in cfg.data.prepare_args
    with pytest.raises(DataConfigError, match=(
            r"python -m umup_jax.prepare_data --source=hf --hf_name=Salesforce/wikitext "
            r"--hf_config=wikitext-103-raw-v1 .*--tokenizer=bpe:32000 --out=.*wt`")):
        train_lib.build_run(cfg)


def test_command_line_writes_the_command_and_refuses_to_overwrite(corpus, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "umup_jax.prepare_data", f"--train_files={corpus}/*.txt",
           f"--valid_files={corpus}/valid/v.txt", "--tokenizer=bytes", f"--out={out}",
           "--workers=1", "--noprogress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared" in proc.stdout and "vocab 257 (uint16)" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    words = shlex.split(meta["command"])
    assert words[:3] == ["python", "-m", "umup_jax.prepare_data"]
    assert words[3] == f"--train_files={corpus}/*.txt" and words[-1] == "--noprogress"
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "pass --overwrite to replace it" in again.stderr


def test_resume_on_prepared_data_is_bit_exact(corpus, tmp_path):
    out = tmp_path / "prepared"
    P.prepare(*sources(corpus), "bytes", out)
    arg = (f"smoke,data.source=prepared,data.prepared_dir={out},train.steps=8,"
           "train.checkpoint_every=4,train.eval_every=8,train.metrics_every=100")
    config = config_lib.proxy_config("umup", arg)
    assert train_lib.build_run(config).model_cfg.vocab_size == 257  # from meta.json
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ref = train_lib.train_and_evaluate(config, str(straight))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    for name in ("results.json", "metrics.jsonl"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "tensorboard")
    res = train_lib.train_and_evaluate(config, str(resumed))

    def losses(workdir, kind):
        return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl", kind)}

    train_ref, train_res = losses(straight, "train"), losses(resumed, "train")
    assert sorted(train_res) == [4, 5, 6, 7]
    assert [train_res[s] for s in range(4, 8)] == [train_ref[s] for s in range(4, 8)]
    assert res["final_eval_loss"] == ref["final_eval_loss"]
    assert res["final_train_loss"] == ref["final_train_loss"]
