"""Data: text sources, tokenizers and the grain pipeline that feeds the train loop.

A run's data is two 1-D token arrays (train and validation).  Training examples are the
non-overlapping windows of ``seq_len + 1`` tokens of the train array (inputs are the first
``seq_len`` tokens, targets the last ``seq_len``), shuffled by grain with a fixed seed, a fresh
permutation each epoch, split across processes and batched.  The pipeline is a pure function of
(seed, position), so its iterator state, a small dict, is saved in every checkpoint and a
resumed run sees exactly the batches an uninterrupted one would.

Sources (``config.data.source``):

* ``bundled``: the corpus shipped in ``data/`` (Shakespeare and Milton, public domain; see
  ``data/PROVENANCE.md``) with its fixed train/validation split.
* ``text``: UTF-8 text files or globs (``train_files``, ``valid_files``).
* ``memmap``: pre-tokenized ``.bin`` files of ``uint16``/``uint32`` (``train_bin``,
  ``valid_bin``, ``bin_dtype``); ``vocab_size`` must be given.
* ``hf``: a Hugging Face ``datasets`` dataset already in the local cache (``hf_name``,
  ``hf_config``, ``hf_text_field``), e.g. ``wikitext``/``wikitext-103-raw-v1``; loaded with
  ``HF_DATASETS_OFFLINE=1``, never downloaded.

Tokenizers (``config.data.tokenizer``): ``bytes`` (V = 256), ``bpe`` (byte-level BPE trained
with Hugging Face ``tokenizers`` on the train split to ``vocab_size``, cached by content hash),
or a path to a ``tokenizer.json``.

The cache (``data.cache_dir``, else ``$UMUP_JAX_CACHE``, else ``~/.cache/umup_jax``) is flat:

* ``bpe-<V>-<key>.json``: a trained BPE; ``key`` hashes the ``tokenizers`` version, V and the
  full training text;
* ``tokens-<tokenizer name>-<key>.npy``: one tokenized split; ``key`` hashes the tokenizer's
  *content* (:attr:`ByteTokenizer.fingerprint`/:attr:`HFTokenizer.fingerprint`: the sha256
  of its serialized JSON, so two BPEs with the same name and size but different merges never
  share entries), the split name and the full text of the split (every input file's bytes,
  read and hashed on each run: exact, at the cost of hashing the text, which is negligible
  next to tokenizing it).

Entries are written to a uniquely named temporary file and renamed into place, so concurrent
runs that tokenize the same data do not collide, and a killed run leaves no partial entry.
Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import logging
import lzma
import os
import pathlib
import tempfile
from typing import Any, Optional

import grain
import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("bundled", "text", "memmap", "hf")
BUNDLED_DIR = pathlib.Path(__file__).resolve().parent.parent / "data"
BUNDLED_FILES = {"train": "corpus_train.txt.xz", "valid": "corpus_valid.txt.xz"}


class DataConfigError(ValueError):
    """A data setting that cannot work (names the field)."""


# ---------------------------------------------------------------------------------------------
# Text sources
# ---------------------------------------------------------------------------------------------


def _read_text(path: pathlib.Path) -> str:
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _expand(field: str, patterns) -> list[pathlib.Path]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise DataConfigError(f"data.{field} is empty: give one or more files or globs")
    paths: list[pathlib.Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise DataConfigError(f"data.{field}: no file matches {pattern!r}")
        paths.extend(pathlib.Path(m) for m in matches)
    return paths


def _file_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_disjoint(train: list[pathlib.Path], valid: list[pathlib.Path]) -> None:
    """Refuses validation files that are also training files: the same path (after resolving
    links) or the same bytes under another name.  Either would leak the validation text into
    training and make the validation loss a training loss."""
    train_paths = {p.resolve(): p for p in train}
    by_size: dict[int, list[pathlib.Path]] = {}
    for p in train:
        by_size.setdefault(p.stat().st_size, []).append(p)
    overlap = []
    for v in valid:
        if v.resolve() in train_paths:
            overlap.append(str(v))
            continue
        twin = next((t for t in by_size.get(v.stat().st_size, [])
                     if _file_digest(t) == _file_digest(v)), None)
        if twin is not None:
            overlap.append(f"{v} (same bytes as {twin})")
    if overlap:
        raise DataConfigError(
            f"data.valid_files overlap data.train_files: {', '.join(overlap)}; validation "
            "text must not be trained on. Make the two globs select disjoint files"
        )


def bundled_paths(data_dir: Optional[str] = None) -> dict[str, pathlib.Path]:
    root = pathlib.Path(data_dir) if data_dir else BUNDLED_DIR
    paths = {split: root / name for split, name in BUNDLED_FILES.items()}
    for split, path in paths.items():
        if not path.exists():
            raise DataConfigError(
                f"data.data_dir: the bundled {split} file {path} is missing "
                "(rebuild it with `python data/build_corpus.py`)"
            )
    return paths


def load_texts(cfg) -> dict[str, str]:
    """{'train': text, 'valid': text} for the text sources."""
    if cfg.source == "bundled":
        return {split: _read_text(p) for split, p in bundled_paths(cfg.data_dir).items()}
    if cfg.source == "text":
        train = _expand("train_files", cfg.train_files)
        valid = _expand("valid_files", cfg.valid_files)
        check_disjoint(train, valid)
        return {
            "train": "\n\n".join(_read_text(p) for p in train),
            "valid": "\n\n".join(_read_text(p) for p in valid),
        }
    if cfg.source == "hf":
        return _load_hf(cfg)
    raise DataConfigError(f"data.source={cfg.source!r} has no text (allowed: {SOURCES})")


def _load_hf(cfg) -> dict[str, str]:
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets  # optional extra
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataConfigError(
            "data.source='hf' needs the optional `datasets` package (pip install datasets)"
        ) from e
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None)
    except Exception as e:  # pragma: no cover - depends on the local cache
        raise DataConfigError(
            f"data.hf_name={cfg.hf_name!r}: not loadable from the local cache "
            f"(no network at run time): {e}"
        ) from e
    out = {}
    for split, name in (("train", "train"), ("valid", "validation")):
        if name not in ds:
            raise DataConfigError(f"data.hf_name={cfg.hf_name!r} has no {name!r} split")
        out[split] = "\n".join(ds[name][cfg.hf_text_field])
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256."""

    vocab_size = 256
    name = "bytes"
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (byte-level BPE or a given tokenizer.json)."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size()
        # What the ids mean: the serialized tokenizer (vocabulary, merges, normalisation).
        self.fingerprint = _sha("hf-tokenizer", tokenizer.to_str())

    def to_json(self) -> str:
        """The serialized tokenizer (Hugging Face ``tokenizer.json`` format)."""
        return self._tok.to_str()

    def encode(self, text: str) -> np.ndarray:
        # Encode in chunks of lines: one huge string is slow and memory hungry.
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 2048]) for i in range(0, len(lines), 2048)]
        ids = [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(chunks)]
        out = np.concatenate(ids) if ids else np.zeros((0,), np.uint32)
        return out.astype(np.uint16) if self.vocab_size <= 2**16 else out

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, path) -> None:
        """Writes the tokenizer as a Hugging Face ``tokenizer.json`` (atomically)."""
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, path)


def _atomic_write(path: pathlib.Path, write) -> None:
    """``write(tmp_path)`` then rename to ``path``; the temporary name is unique per process
    and call, so concurrent writers of the same entry never collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_bpe(text: str, vocab_size: int, cache_dir: pathlib.Path) -> HFTokenizer:
    """Byte-level BPE trained on ``text`` to ``vocab_size``; cached by (text, size) hash.

    Training is single-threaded (``RAYON_NUM_THREADS=1``) so that the merges, and hence every
    token id, are the same on every machine.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    key = _sha("bpe-v1", tokenizers.__version__, str(vocab_size), text)
    path = cache_dir / f"bpe-{vocab_size}-{key}.json"
    if path.exists():
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), f"bpe{vocab_size}")
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(
        ("".join(lines[i : i + 512]) for i in range(0, len(lines), 512)), trainer=trainer
    )
    _atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return HFTokenizer(tok, f"bpe{vocab_size}")


def make_tokenizer(cfg, train_text: str, cache_dir: pathlib.Path):
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return train_bpe(train_text, cfg.vocab_size, cache_dir)
    path = pathlib.Path(os.path.expanduser(cfg.tokenizer))
    if path.suffix == ".json":
        if not path.exists():
            raise DataConfigError(f"data.tokenizer: {path} does not exist")
        import tokenizers

        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), path.name)
    raise DataConfigError(
        f"data.tokenizer={cfg.tokenizer!r} is invalid: use 'bytes', 'bpe' or a tokenizer.json"
    )


# ---------------------------------------------------------------------------------------------
# Token arrays
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenData:
    """Tokenized splits and what made them."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    tokenizer: Any  # ByteTokenizer | HFTokenizer | None (memmap)
    description: str


def _cached_encode(tokenizer, text: str, cache_dir: pathlib.Path, tag: str) -> np.ndarray:
    key = _sha("tokens-v2", tokenizer.fingerprint, tag, text)
    path = cache_dir / f"tokens-{tokenizer.name}-{key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    arr = tokenizer.encode(text)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)

    _atomic_write(path, write)
    return arr


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("UMUP_JAX_CACHE", "~/.cache/umup_jax")).expanduser()


def load_tokens(cfg, cache_dir: Optional[str] = None) -> TokenData:
    """Loads (and caches) the tokenized train and validation splits of ``config.data``."""
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if cfg.source not in SOURCES:
        raise DataConfigError(f"data.source={cfg.source!r} is invalid: allowed are {SOURCES}")
    if cfg.source == "memmap":
        dtype = np.dtype(cfg.bin_dtype)
        if dtype not in (np.uint16, np.uint32):
            raise DataConfigError(f"data.bin_dtype={cfg.bin_dtype!r}: use uint16 or uint32")
        arrays = {}
        for split, field in (("train", "train_bin"), ("valid", "valid_bin")):
            path = pathlib.Path(os.path.expanduser(getattr(cfg, field) or ""))
            if not path.is_file():
                raise DataConfigError(f"data.{field}={getattr(cfg, field)!r}: file not found")
            arrays[split] = np.memmap(path, dtype=dtype, mode="r")
        top = int(max(arrays["train"].max(initial=0), arrays["valid"].max(initial=0)))
        if top >= cfg.vocab_size:
            raise DataConfigError(
                f"data.vocab_size={cfg.vocab_size} is too small for token id {top} in the .bin files"
            )
        return TokenData(arrays["train"], arrays["valid"], cfg.vocab_size, None,
                         f"memmap {cfg.train_bin}")
    texts = load_texts(cfg)
    tokenizer = make_tokenizer(cfg, texts["train"], cache)
    arrays = {s: _cached_encode(tokenizer, t, cache, s) for s, t in texts.items()}
    return TokenData(arrays["train"], arrays["valid"], tokenizer.vocab_size, tokenizer,
                     f"{cfg.source} / {tokenizer.name}")


# ---------------------------------------------------------------------------------------------
# The grain pipeline
# ---------------------------------------------------------------------------------------------


class _Windows:
    """Random-access source of the non-overlapping (seq_len + 1)-token windows of an array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def _split(batch: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": batch[:, :-1], "targets": batch[:, 1:]}


def train_dataset(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless shuffled batches for this process: ``batch_size`` is the *global* batch; each
    process reads its own disjoint 1/process_count of every global batch."""
    if batch_size % process_count:
        raise DataConfigError(
            f"train.batch_size={batch_size} is not divisible by the {process_count} processes"
        )
    windows = _Windows(tokens, seq_len)
    if len(windows) < 1:
        raise DataConfigError(
            f"model.seq_len={seq_len} is longer than the training data ({len(tokens)} tokens)"
        )
    ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_split)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
    process_index: int = 0, process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The fixed validation batches (in order, no shuffle): at most ``max_batches``."""
    windows = _Windows(tokens, seq_len)
    if len(windows) < batch_size:
        raise DataConfigError(
            f"the validation split has {len(windows)} windows of model.seq_len={seq_len}+1 "
            f"tokens, fewer than one batch of train.eval_batch_size={batch_size}"
        )
    n = min(max_batches, len(windows) // batch_size)
    local = batch_size // process_count
    out = []
    for b in range(n):
        rows = [windows[b * batch_size + process_index * local + j] for j in range(local)]
        out.append(_split(np.stack(rows)))
    return out


def epochs_covered(tokens: np.ndarray, seq_len: int, batch_size: int, steps: int) -> float:
    return steps * batch_size / max(num_windows(tokens, seq_len), 1)


class Prefetcher:
    """Reads batches from a grain iterator on a background thread, ``depth`` ahead, so that
    input work overlaps the device step.  ``state()`` is the iterator state of the next batch
    that ``next()`` will return (what a checkpoint must store)."""

    def __init__(self, iterator, depth: int = 2):
        import queue
        import threading

        self._it = iterator
        self._q: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                state = self._it.get_state()
                item = next(self._it)
                while not self._stop.is_set():
                    try:
                        self._q.put((state, item), timeout=0.1)
                        break
                    except Exception:  # queue.Full
                        continue
        except BaseException as e:  # surfaced in next()
            self._error = e
            self._q.put((None, None))

    def next(self):
        """Returns (state_before, batch): state_before restores an iterator to this batch."""
        state, item = self._q.get()
        if item is None and self._error is not None:
            raise self._error
        return state, item

    def close(self) -> None:
        self._stop.set()
        while not self._q.empty():
            try:
                self._q.get_nowait()
            except Exception:
                break

