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
  ``valid_bin``, ``bin_dtype``), nanoGPT style; ``vocab_size`` must be given.
* ``prepared``: a directory written by ``python -m umup_jax.prepare_data`` (``prepared_dir``):
  ``{train,valid}.bin`` memory-mapped, the vocabulary from its ``meta.json``, checked against
  the bins' sizes and the sha256 of its ``tokenizer.json``.
* ``hf``: a Hugging Face ``datasets`` dataset (``hf_name``, ``hf_config``, ``hf_train_split``,
  ``hf_valid_split``, ``hf_text_field``, ``hf_documents``), or a directory written by
  ``save_to_disk``; on first use streamed (``hf_streaming``, the default; else downloaded
  whole first; online unless the user sets ``HF_DATASETS_OFFLINE=1``) and tokenized document
  by document with :func:`umup_jax.prepare_data.prepare` into a prepared directory in the
  cache, keyed by the dataset's identity (streamed or not, the same entry), and read like
  ``prepared``.

Tokenizers (``config.data.tokenizer``): ``bytes`` (V = 256), ``bpe`` (byte-level BPE trained
with Hugging Face ``tokenizers`` on the train split to ``vocab_size``, cached by content hash),
or a path to a ``tokenizer.json``.  Prepared data (``prepared``, ``hf``) has a document
separator ``<|endoftext|>`` after every document: for bytes it is id 256 (V = 257), for a BPE
trained by ``prepare_data`` it is the trainer's special token 0.

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
import functools
import glob
import hashlib
import json
import logging
import lzma
import os
import pathlib
import tempfile
from typing import Any, Iterable, Optional, Union

import grain
import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("bundled", "text", "memmap", "prepared", "hf")
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


def check_distinct_splits(train: str, valid: str, train_field: str, valid_field: str) -> None:
    """Refuses a validation split named as the training split (``hf_train_split ==
    hf_valid_split``): the validation loss would be a training loss.  Slices of one split
    (``train[:99%]``, ``train[99%:]``) are different names and pass."""
    if train == valid:
        raise DataConfigError(
            f"{valid_field}={valid!r} is the training split ({train_field}={train!r}); "
            "validation text must not be trained on. Use another split, or disjoint slices "
            "such as 'train[:99%]' and 'train[99%:]'")


def check_disjoint(train: list[pathlib.Path], valid: list[pathlib.Path],
                   fields: tuple[str, str] = ("data.train_files", "data.valid_files")) -> None:
    """Refuses validation files that are also training files: the same path (after resolving
    links) or the same bytes under another name.  Either would leak the validation text into
    training and make the validation loss a training loss.  ``fields``: the config fields
    (train, valid) the message names."""
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
            f"{fields[1]} overlap {fields[0]}: {', '.join(overlap)}; validation "
            "text must not be trained on. Make the two select disjoint files"
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
    raise DataConfigError(f"data.source={cfg.source!r} has no text (allowed: {SOURCES})")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


EOS_TOKEN = "<|endoftext|>"  # the document separator of prepared data


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b → a printable character (the map ``tokenizers``'
    ``ByteLevel`` pre-tokenizer applies before its model sees a word)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256."""

    vocab_size = 256
    name = "bytes"
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @staticmethod
    def as_hf(eos_token: Optional[str] = EOS_TOKEN) -> "HFTokenizer":
        """The same tokenizer as a ``tokenizers`` BPE without merges (id b = byte b), plus
        ``eos_token`` as special token 256: V = 257 (``None``: no special token, V = 256).
        What ``prepare_data --tokenizer=bytes`` and ``export`` of a bytes run write as
        ``tokenizer.json``, so that any ``tokenizers`` user can read the ids."""
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if eos_token is not None:
            tok.add_special_tokens([eos_token])
        return HFTokenizer(tok, "bytes")


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

    @classmethod
    def from_file(cls, path: Union[str, pathlib.Path], name: Optional[str] = None) -> "HFTokenizer":
        import tokenizers

        return cls(tokenizers.Tokenizer.from_file(str(path)), name or pathlib.Path(path).name)

    @property
    def hf(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def token_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

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
        _atomic_write(pathlib.Path(path), lambda tmp: self._tok.save(str(tmp)))


def _umask() -> int:
    """This process's umask, read from ``/proc/self/status`` where Linux gives it: the portable
    way, ``os.umask``, reads it by setting it, and a file another thread (the prefetcher,
    orbax's writers) created in between would get mode 0o666."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_mode(directory: bool = False) -> int:
    """The mode ``open`` or ``mkdir`` would give a new file or directory under this process's
    umask (0o644 / 0o755 under the common 022), for what ``tempfile`` creates 0o600 / 0o700."""
    return (0o777 if directory else 0o666) & ~_umask()


def _atomic_write(path: pathlib.Path, write) -> None:
    """``write(tmp_path)`` then rename to ``path``, with the mode a plain write would give it
    (readable by the group and others under the usual umask: a run's tokenizer and the shared
    cache are read by other users' ``sample``, ``export`` and sweep workers); the temporary
    name is unique per process and call, so concurrent writers of the same entry never
    collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, usual_mode())
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


def train_bpe(
    texts: Union[str, Iterable[str]],
    vocab_size: int,
    cache_dir: Optional[pathlib.Path] = None,
    special_tokens: tuple[str, ...] = (),
) -> HFTokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space) trained to ``vocab_size``.

    ``texts`` is one string (fed to the trainer in pieces of 512 lines) or an iterable of
    strings (documents, fed as they come).  ``special_tokens`` take the first ids (0, 1, ...)
    and count towards ``vocab_size``.  With ``cache_dir`` and a string, the result is cached by
    the hash of (text, size, special tokens).

    Training is single-threaded (``RAYON_NUM_THREADS=1``) so that the merges, and hence every
    token id, are the same on every machine.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    name = f"bpe{vocab_size}"
    path = None
    if cache_dir is not None and isinstance(texts, str):
        key = _sha("bpe-v1", tokenizers.__version__, str(vocab_size), texts,
                   *(("special",) + tuple(special_tokens) if special_tokens else ()))
        path = cache_dir / f"bpe-{vocab_size}-{key}.json"
        if path.exists():
            return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), name)
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    if isinstance(texts, str):
        lines = texts.splitlines(keepends=True)
        texts = ("".join(lines[i : i + 512]) for i in range(0, len(lines), 512))
    tok.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        _atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return HFTokenizer(tok, name)


def _tokenizer_file(spec: str, must_exist: bool = True) -> Optional[pathlib.Path]:
    """``data.tokenizer`` as the ``tokenizer.json`` it names, ``None`` for ``bytes`` and
    ``bpe``; :class:`DataConfigError` for anything else or (``must_exist``) a missing file."""
    if spec in ("bytes", "bpe"):
        return None
    path = pathlib.Path(os.path.expanduser(spec))
    if path.suffix != ".json":
        raise DataConfigError(
            f"data.tokenizer={spec!r} is invalid: use 'bytes', 'bpe' (of data.vocab_size "
            "tokens) or a tokenizer.json")
    if must_exist and not path.exists():
        raise DataConfigError(f"data.tokenizer: {path} does not exist")
    return path


def check_data_config(cfg) -> None:
    """What ``config.data`` can be checked for without reading anything: the source, the
    form of the tokenizer of the sources that tokenize here (``bundled``, ``text``), the
    ``memmap`` dtype.  :func:`load_tokens` checks the rest (files, globs, prepared
    directories), so a finished run whose data is gone still reruns as finished."""
    if cfg.source not in SOURCES:
        raise DataConfigError(f"data.source={cfg.source!r} is invalid: allowed are {SOURCES}")
    if cfg.source in ("bundled", "text"):
        _tokenizer_file(cfg.tokenizer, must_exist=False)
    if cfg.source == "memmap":
        try:
            dtype = np.dtype(cfg.bin_dtype)
        except TypeError:
            dtype = None
        if dtype not in (np.uint16, np.uint32):
            raise DataConfigError(f"data.bin_dtype={cfg.bin_dtype!r}: use uint16 or uint32")


def make_tokenizer(cfg, train_text: str, cache_dir: pathlib.Path):
    path = _tokenizer_file(cfg.tokenizer)
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return train_bpe(train_text, cfg.vocab_size, cache_dir)
    import tokenizers

    return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), path.name)


# ---------------------------------------------------------------------------------------------
# Token arrays
# ---------------------------------------------------------------------------------------------


# token_fingerprint: a split of at most this many tokens is hashed whole; a longer one by
# FINGERPRINT_BLOCKS evenly spaced blocks of FINGERPRINT_BLOCK_TOKENS tokens (64 MiB read).
FINGERPRINT_FULL_TOKENS = 1 << 26
FINGERPRINT_BLOCKS = 4096
FINGERPRINT_BLOCK_TOKENS = 4096


def token_fingerprint(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> str:
    """What a run trains and evaluates on, as 16 hex digits of a sha256: the vocabulary size,
    each split's length, and its token ids as little-endian uint32 (so a uint16 ``.bin`` and
    the same ids held as int32 agree).  A split of at most ``FINGERPRINT_FULL_TOKENS`` (64 M)
    tokens is hashed whole, so any changed token changes the fingerprint; a longer one by
    ``FINGERPRINT_BLOCKS`` evenly spaced blocks (the first and last included) and its exact
    length, which bounds the cost at 64 MiB read per split: re-tokenizing, re-shuffling,
    another tokenizer or another corpus changes nearly every block, but an edit confined to
    the gaps between blocks of a very large split goes unnoticed.  Checkpoints store it, so a
    run does not resume on other tokens under the same config (:mod:`umup_jax.train`)."""
    h = hashlib.sha256(f"umup_jax.tokens/1 vocab_size={int(vocab_size)}".encode())
    for name, tokens in (("train", train), ("valid", valid)):
        flat = np.asarray(tokens).reshape(-1)
        n = int(flat.size)
        h.update(f";{name}:{n}:".encode())
        if n <= FINGERPRINT_FULL_TOKENS:
            spans = [(a, min(a + (1 << 20), n)) for a in range(0, n, 1 << 20)]
        else:
            starts = np.linspace(0, n - FINGERPRINT_BLOCK_TOKENS, FINGERPRINT_BLOCKS)
            spans = [(int(a), int(a) + FINGERPRINT_BLOCK_TOKENS) for a in starts]
        for a, b in spans:
            h.update(np.ascontiguousarray(flat[a:b], dtype="<u4").tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class TokenData:
    """Tokenized splits and what made them."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    tokenizer: Any  # ByteTokenizer | HFTokenizer | None (memmap)
    description: str

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`token_fingerprint` of the two splits (computed once)."""
        return token_fingerprint(self.train, self.valid, self.vocab_size)


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


# ---------------------------------------------------------------------------------------------
# Prepared directories (written by ``python -m umup_jax.prepare_data``)
# ---------------------------------------------------------------------------------------------

PREPARED_FORMAT = "umup_jax.prepared/1"
PREPARED_SPLITS = ("train", "valid")
PREPARED_DTYPES = ("uint16", "uint32")


def sha256_file(path: Union[str, pathlib.Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bin_dtype_for(vocab_size: int) -> str:
    """``uint16`` when every id < ``vocab_size`` fits (V ≤ 2¹⁶), else ``uint32``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def prepare_hint(directory: str, prepare_args: str = "") -> str:
    """The command that makes ``directory``: ``prepare_args`` (e.g. a config variant's) or a
    template."""
    args = prepare_args or ("--source=text --train_files='train/*.txt' "
                            "--valid_files='valid/*.txt' --tokenizer=bpe:32000")
    return f"python -m umup_jax.prepare_data {args} --out={directory}"


def read_prepared_meta(directory: Union[str, pathlib.Path], field: str = "data.prepared_dir",
                       hint: str = "") -> dict:
    """``directory/meta.json``, checked for the fields the loader needs."""
    root = pathlib.Path(os.path.expandvars(os.path.expanduser(str(directory))))
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        what = "does not exist" if not root.exists() else "has no meta.json"
        raise DataConfigError(
            f"{field}={str(directory)!r}: {root} {what}, so it is not prepared data; make it "
            f"with `{hint or prepare_hint(str(directory))}`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataConfigError(f"{meta_path}: not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != PREPARED_FORMAT:
        raise DataConfigError(
            f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r} "
            f"is not {PREPARED_FORMAT!r} (written by another version? re-run prepare_data)"
        )
    try:
        vocab, dtype = int(meta["vocab_size"]), str(meta["dtype"])
        for split in PREPARED_SPLITS:
            int(meta["splits"][split]["tokens"]), str(meta["splits"][split]["file"])
        str(meta["tokenizer"]["file"]), str(meta["tokenizer"]["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataConfigError(f"{meta_path}: missing or malformed field {e}") from e
    if dtype not in PREPARED_DTYPES:
        raise DataConfigError(f"{meta_path}: dtype {dtype!r} is not one of {PREPARED_DTYPES}")
    if vocab < 2 or (dtype == "uint16" and vocab > 2**16):
        raise DataConfigError(
            f"{meta_path}: vocab_size {vocab} does not fit dtype {dtype} (uint16 holds ids "
            "< 65536; larger vocabularies need uint32)"
        )
    return meta


def load_prepared(directory: Union[str, pathlib.Path], field: str = "data.prepared_dir",
                  hint: str = "") -> TokenData:
    """Memory-maps a prepared directory's bins after checking them against its meta.json: each
    bin's size is ``tokens × itemsize`` of the recorded dtype, and ``tokenizer.json``'s sha256
    and vocabulary size are the recorded ones.  Fails naming the file that disagrees."""
    meta = read_prepared_meta(directory, field, hint)
    root = pathlib.Path(os.path.expandvars(os.path.expanduser(str(directory))))
    dtype = np.dtype(meta["dtype"])
    redo = "the directory is damaged or was changed after prepare_data wrote it; re-run it"
    tok_path = root / meta["tokenizer"]["file"]
    if not tok_path.is_file():
        raise DataConfigError(f"{tok_path} is missing ({field}={str(directory)!r}); {redo}")
    digest = sha256_file(tok_path)
    if digest != meta["tokenizer"]["sha256"]:
        raise DataConfigError(
            f"{tok_path}: sha256 {digest[:16]}… does not match meta.json's "
            f"{meta['tokenizer']['sha256'][:16]}…: this is not the tokenizer that made the "
            f"bins; {redo}"
        )
    tokenizer = HFTokenizer.from_file(tok_path, str(meta["tokenizer"].get("spec", "prepared")))
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataConfigError(
            f"{tok_path}: {tokenizer.vocab_size} tokens, but meta.json says vocab_size "
            f"{meta['vocab_size']}; {redo}"
        )
    arrays = {}
    for split in PREPARED_SPLITS:
        info = meta["splits"][split]
        path = root / info["file"]
        expected = int(info["tokens"]) * dtype.itemsize
        if not path.is_file():
            raise DataConfigError(f"{path} is missing ({field}={str(directory)!r}); {redo}")
        size = path.stat().st_size
        if size != expected:
            raise DataConfigError(
                f"{path}: {size:,} bytes, but meta.json says {int(info['tokens']):,} {dtype.name} "
                f"tokens = {expected:,} bytes (a truncated file, or one of another dtype); {redo}"
            )
        if size == 0:
            raise DataConfigError(f"{path}: the {split} split has no tokens")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r")
    source = meta.get("source", {})
    what = source.get("name") or source.get("kind", "?")
    return TokenData(arrays["train"], arrays["valid"], int(meta["vocab_size"]), tokenizer,
                     f"prepared {root} ({what}, {meta['tokenizer'].get('spec', '?')})")


def load_tokens(cfg, cache_dir: Optional[str] = None, prepare: bool = True) -> TokenData:
    """Loads (and caches) the tokenized train and validation splits of ``config.data``.

    ``prepare=False``: a ``data.source='hf'`` dataset that is not yet prepared in the cache is
    a :class:`DataConfigError` instead of being streamed and tokenized (hours for a large
    corpus); the other sources are read as always."""
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    check_data_config(cfg)
    if cfg.source == "memmap":
        dtype = np.dtype(cfg.bin_dtype)
        arrays = {}
        for split, field in (("train", "train_bin"), ("valid", "valid_bin")):
            path = pathlib.Path(os.path.expanduser(getattr(cfg, field) or ""))
            if not path.is_file():
                raise DataConfigError(f"data.{field}={getattr(cfg, field)!r}: file not found")
            arrays[split] = np.memmap(path, dtype=dtype, mode="r")
        check_disjoint([pathlib.Path(arrays["train"].filename)],
                       [pathlib.Path(arrays["valid"].filename)],
                       ("data.train_bin", "data.valid_bin"))
        top = int(max(arrays["train"].max(initial=0), arrays["valid"].max(initial=0)))
        if top >= cfg.vocab_size:
            raise DataConfigError(
                f"data.vocab_size={cfg.vocab_size} is too small for token id {top} in the .bin files"
            )
        return TokenData(arrays["train"], arrays["valid"], cfg.vocab_size, None,
                         f"memmap {cfg.train_bin}")
    if cfg.source == "prepared":
        if not cfg.prepared_dir:
            raise DataConfigError("data.prepared_dir is empty: give the directory that "
                                  "`python -m umup_jax.prepare_data --out=DIR` wrote")
        return load_prepared(cfg.prepared_dir, "data.prepared_dir",
                             prepare_hint(cfg.prepared_dir, cfg.prepare_args))
    if cfg.source == "hf":
        from umup_jax import prepare_data  # imports this module; deferred to avoid a cycle

        return load_prepared(prepare_data.prepare_hf_cached(cfg, cache, make=prepare),
                             "data.hf_name")
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

