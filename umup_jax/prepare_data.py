"""Corpus → prepared directory: ``python -m umup_jax.prepare_data``.

Tokenizes a corpus once, so that training reads memory-mapped token files
(``data.source="prepared"``, ``data.prepared_dir=DIR``).  It writes::

    DIR/train.bin, DIR/valid.bin   token ids, little-endian uint16 when V ≤ 2¹⁶, else uint32
    DIR/tokenizer.json             the tokenizer (Hugging Face ``tokenizers`` format)
    DIR/meta.json                  vocab_size, dtype, tokens and documents per split, the source,
                                   the tokenizer's spec and sha256 (of tokenizer.json's bytes),
                                   the BPE sample, the command line

Sources (``--source``):

* ``text``: UTF-8 files or globs (``--train_files``, ``--valid_files``; ``.xz`` and ``.gz``
  are read decompressed; line endings become ``\\n``).  A document is the text between two
  ``--doc_separator`` strings (default ``"\\n\\f\\n"``, a line holding only a form feed, the
  bundled corpus' format) or a file's start/end.  Empty files, files that are not UTF-8 text
  and files containing NUL bytes are refused, naming the file.
* ``hf``: a Hugging Face dataset (``--hf_name``, ``--hf_config``, ``--hf_train_split``,
  ``--hf_valid_split``, ``--hf_text_field``), streamed by default (``--hf_streaming``;
  ``data.hf_streaming`` for ``data.source="hf"``), or a directory written by ``save_to_disk``
  (read from disk, never streamed).  Online unless the user sets ``HF_DATASETS_OFFLINE=1``.
  ``--hf_documents=rows``: each row is a document; ``wikitext``: WikiText stores one line per
  row, so rows are grouped into articles, a new one starting at each top-level heading row
  (``" = Title = "``), an empty row standing for a blank line.

Document separators: every document is followed by the end-of-text token (``--eos_token``,
default ``<|endoftext|>``), so ``train.bin`` is ``doc₁ EOS doc₂ EOS … docₙ EOS``.  For
``--tokenizer=bytes`` the ids 0-255 are the UTF-8 bytes and EOS is id 256 (V = 257); for
``bpe:N`` it is the trainer's special token, id 0 (V = N); for a given ``tokenizer.json`` it is
that token's id, added as a new special token at id V when the tokenizer lacks it (a
tokenizer.json whose ids have gaps, largest id ≥ its token count V, is refused).  Documents
are encoded as ordinary text (the literal string ``<|endoftext|>`` inside a document is not
the separator), documents that are empty or only whitespace are skipped.

BPE (``--tokenizer=bpe:N``): byte-level, trained single-threaded (deterministic, see
:func:`umup_jax.data.train_bpe`) on a sample of whole train documents of at most
``--bpe_sample_mb`` million characters.  ``--bpe_sample=spread`` (default) takes document i when
a fixed hash of i is below p = bound / (the train split's size), so the sample is spread over
the whole split and a fixed function of it; the size is the files' bytes (compressed files
counted ×4, an estimate) or the dataset's recorded size; when it is unknown (e.g. a stream
without size metadata) p = 1.  ``head`` takes the first documents (reads only the start of a
stream; ``spread`` reads a stream twice).

Encoding is done in chunks of about 2 M characters, by ``--workers`` processes (forked when no
JAX backend runs in this process, else spawned; ``bytes`` encodes in the main process), with at most
2 × workers chunks in flight, so memory stays bounded whatever the corpus size; a document
longer than 1 M characters is encoded in pieces cut before a newline (or space) that follows a
printable ASCII character, where byte-level BPE's pre-tokenizer always has a word boundary, so
the ids equal those of encoding the document whole.  Byte-level BPE tokenizers are encoded by
an exact fast path (the GPT-2 pre-tokenizer pattern in the ``regex`` module and a word cache,
every character class checked against ``tokenizers``' own pre-tokenizer); other tokenizers by
``tokenizers`` itself.

The output is written into ``.DIR.tmp-*`` beside DIR and renamed to DIR at the end (meta.json
is written last), so an interrupted run never leaves a DIR that looks complete.  An existing
DIR is refused unless ``--overwrite`` (which also refuses a DIR holding files that
prepare_data does not write).

    python -m umup_jax.prepare_data --source=text --train_files='corpus/train/*.txt' \\
        --valid_files='corpus/valid/*.txt' --tokenizer=bpe:32000 --out=data/my_corpus
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import multiprocessing
import os
import pathlib
import re
import secrets
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from umup_jax import data as data_lib
from umup_jax.data import DataConfigError

log = logging.getLogger(__name__)

PIECE_CHARS = 1 << 20  # documents longer than this are encoded in pieces
CHUNK_CHARS = 1 << 21  # the unit of work sent to a worker
BPE_SAMPLE_MB = 256.0  # default bound on the BPE training sample (millions of characters)
PREPARED_FILES = ("meta.json", "tokenizer.json", "train.bin", "valid.bin")
HF_DOCUMENTS = ("rows", "wikitext")
BPE_SAMPLE_MODES = ("spread", "head")
_READ_CHARS = 1 << 20

Piece = tuple[str, bool]  # (text, whether it ends a document)


# ---------------------------------------------------------------------------------------------
# Cutting long documents where byte-level BPE has a word boundary
# ---------------------------------------------------------------------------------------------


def cut_point(text: str, lo: int, hi: int) -> int:
    """The largest i in (lo, hi] with ``text[i]`` a newline (else a space) and ``text[i-1]`` a
    printable non-space ASCII character, or -1.

    At such an i the GPT-2 pre-tokenizer pattern always starts a new word (no alternative
    matches a non-space followed by whitespace, and matching from i never looks behind), so
    encoding ``text[:i]`` and ``text[i:]`` separately gives the ids of encoding ``text``.
    """
    for ch in ("\n", " "):
        i = text.rfind(ch, lo + 1, hi + 1)
        while i > lo:
            if "!" <= text[i - 1] <= "~":
                return i
            i = text.rfind(ch, lo + 1, i)
    return -1


_hard_cut_warned = False


def split_document(doc: str, limit: int = PIECE_CHARS, final: bool = True) -> Iterator[Piece]:
    """``doc`` in pieces of at most ``limit`` characters cut at :func:`cut_point`; the last piece
    carries ``final``.  A stretch of ``limit`` characters with no such point is cut anyway (with
    a warning: the ids at that cut may differ from encoding the document whole)."""
    global _hard_cut_warned
    start = 0
    while len(doc) - start > limit:
        i = cut_point(doc, start + limit // 2, start + limit)
        if i < 0:
            i = cut_point(doc, start, start + limit)
        if i < 0:
            i = start + limit
            if not _hard_cut_warned:
                _hard_cut_warned = True
                log.warning("a document has %d characters without a newline or space after an "
                            "ASCII character; cut there", limit)
        yield doc[start:i], False
        start = i
    yield doc[start:], final


# ---------------------------------------------------------------------------------------------
# Document sources
# ---------------------------------------------------------------------------------------------


def decode_escapes(text: str) -> str:
    r"""``"\n\f\n"`` as typed on a command line → the characters (Python escapes)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _open_binary(path: pathlib.Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


@dataclasses.dataclass
class TextFiles:
    """Documents from UTF-8 text files (see the module docstring)."""

    patterns: Sequence[str]
    separator: str = "\n\x0c\n"
    field: str = "--train_files"
    piece_chars: int = PIECE_CHARS

    def __post_init__(self):
        if isinstance(self.patterns, str):
            self.patterns = [self.patterns]
        self.patterns = [p for p in self.patterns if p]

    def paths(self) -> list[pathlib.Path]:
        """The files, globs expanded in sorted order (computed once)."""
        if getattr(self, "_paths", None) is None:
            self._paths = self._expand()
        return self._paths

    def _expand(self) -> list[pathlib.Path]:
        if not self.patterns:
            raise DataConfigError(f"{self.field} is empty: give one or more files or globs")
        out: list[pathlib.Path] = []
        for pattern in self.patterns:
            matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
            files = [pathlib.Path(m) for m in matches if os.path.isfile(m)]
            if not files:
                raise DataConfigError(f"{self.field}: no file matches {pattern!r}")
            out.extend(files)
        return out

    def check(self) -> None:
        self.paths()

    @property
    def where(self) -> str:
        """The files, for messages: ``--train_files=PATTERNS``."""
        return f"{self.field}={','.join(self.patterns)}"

    def size_estimate(self) -> Optional[int]:
        return sum(p.stat().st_size * (4 if p.suffix in (".xz", ".gz") else 1)
                   for p in self.paths())

    def describe(self) -> dict[str, Any]:
        paths = self.paths()
        return {"kind": "text", "name": ",".join(self.patterns), "patterns": list(self.patterns),
                "files": len(paths), "bytes": sum(p.stat().st_size for p in paths),
                "doc_separator": self.separator}

    def documents(self) -> Iterator[Piece]:
        for path in self.paths():
            yield from self._file_documents(path)

    def _file_documents(self, path: pathlib.Path) -> Iterator[Piece]:
        sep, limit = self.separator, self.piece_chars
        where = f"{self.field}: {path}"
        with _open_binary(path) as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline=None)
            buf, started, has_text = "", False, False
            while True:
                try:
                    block = stream.read(_READ_CHARS)
                except UnicodeDecodeError as e:
                    raise DataConfigError(
                        f"{where} is not UTF-8 text ({e.reason} near byte {raw.tell():,}); "
                        "binary files are not allowed"
                    ) from None
                except (OSError, EOFError, lzma.LZMAError) as e:
                    raise DataConfigError(f"{where} cannot be read: {e}") from None
                if not block:
                    break
                if "\x00" in block:
                    raise DataConfigError(
                        f"{where} contains NUL bytes: a binary file? only UTF-8 text is allowed")
                has_text = has_text or not block.isspace()
                buf += block
                if sep and sep in buf:
                    docs = buf.split(sep)
                    buf = docs.pop()
                    for doc in docs:
                        if started or doc.strip():
                            yield from split_document(doc, limit)
                        started = False
                # Emit pieces of a long document; cut only where no separator can begin (a
                # separator's start lies in the last len(sep) - 1 characters, if anywhere).
                while len(buf) - len(sep) > limit:
                    i = cut_point(buf, limit // 2, limit)
                    if i < 0:
                        i = cut_point(buf, 0, limit)
                    if i < 0:
                        break
                    yield buf[:i], False
                    started, buf = True, buf[i:]
                if len(buf) > 64 * limit:  # no cut point in a huge stretch
                    yield from split_document(buf[: len(buf) - len(sep)], limit, final=False)
                    started, buf = True, buf[len(buf) - len(sep):]
            if not has_text:
                raise DataConfigError(f"{where} is empty (no text)")
            if started or buf.strip():
                yield from split_document(buf, limit)


def _hf_import():
    try:
        import datasets  # the optional `hf` extra
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataConfigError(
            "Hugging Face sources need the optional `datasets` package: "
            "pip install 'umup-jax[hf]' (or pip install datasets)"
        ) from e
    return datasets


def _saved_to_disk(name: str) -> bool:
    local = pathlib.Path(os.path.expanduser(name))
    return local.is_dir() and ((local / "dataset_dict.json").is_file()
                               or (local / "state.json").is_file())


def _load_error(name: str, config: str, prefix: str, e: Exception) -> DataConfigError:
    offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    return DataConfigError(
        f"{prefix}hf_name={name!r} ({prefix}hf_config={config!r}) could not be loaded: "
        f"{type(e).__name__}: {e}"
        + (" (HF_DATASETS_OFFLINE is set: only the local cache is used)" if offline else ""))


def open_hf(name: str, config: str = "", streaming: bool = True, prefix: str = "--"):
    """The splits of a Hugging Face dataset (a mapping split name → dataset): a Hub or local
    dataset through ``load_dataset`` (streamed if ``streaming``), or a ``save_to_disk``
    directory through ``load_from_disk`` (already on disk: never streamed)."""
    if not name:
        raise DataConfigError(f"{prefix}hf_name is empty: give a dataset name or directory")
    datasets = _hf_import()
    local = pathlib.Path(os.path.expanduser(name))
    try:
        if _saved_to_disk(name):
            splits = datasets.load_from_disk(str(local))
            if isinstance(splits, datasets.Dataset):
                raise DataConfigError(
                    f"{prefix}hf_name={name!r} holds one split saved with save_to_disk; save a "
                    "DatasetDict with the train and validation splits instead")
            return splits
        return datasets.load_dataset(name, config or None, streaming=streaming)
    except DataConfigError:
        raise
    except Exception as e:
        raise _load_error(name, config, prefix, e) from e


def hf_data_identity(name: str, config: str = "", prefix: str = "--") -> list:
    """What identifies the data of a Hugging Face dataset, the same whether it is streamed or
    downloaded, and known before either (so it keys the ``data.source='hf'`` cache): for a
    ``save_to_disk`` directory its splits' fingerprints; else the dataset builder's config id,
    version and hash (a Hub dataset's commit; for local data files, a hash of their paths and
    modification times), which ``load_dataset_builder`` resolves without reading the data."""
    if not name:
        raise DataConfigError(f"{prefix}hf_name is empty: give a dataset name or directory")
    if _saved_to_disk(name):
        splits = open_hf(name, config, prefix=prefix)
        return ["save_to_disk", {split: getattr(ds, "_fingerprint", None)
                                 for split, ds in splits.items()}]
    datasets = _hf_import()
    try:
        builder = datasets.load_dataset_builder(name, config or None)
    except Exception as e:
        raise _load_error(name, config, prefix, e) from e
    return ["builder", builder.config_id, str(builder.config.version), builder.hash]


@dataclasses.dataclass
class HFSplit:
    """Documents from one split of a Hugging Face dataset (see the module docstring)."""

    splits: Any  # what open_hf returned
    split: str
    text_field: str = "text"
    documents_mode: str = "rows"
    name: str = ""
    config: str = ""
    split_field: str = "--hf_train_split"
    prefix: str = "--"
    streaming: bool = True
    piece_chars: int = PIECE_CHARS

    def check(self) -> None:
        if self.documents_mode not in HF_DOCUMENTS:
            raise DataConfigError(f"{self.prefix}hf_documents={self.documents_mode!r} is "
                                  f"invalid: use one of {HF_DOCUMENTS}")
        names = list(self.splits.keys())
        if self.split not in names:
            raise DataConfigError(
                f"{self.split_field}={self.split!r}: {self.name or 'the dataset'} has no such "
                f"split (it has {names}); set {self.split_field} to one of them")
        columns = self.dataset.column_names
        if columns is not None and self.text_field not in columns:
            raise DataConfigError(self._missing_field(columns))

    def _missing_field(self, columns) -> str:
        return (f"{self.prefix}hf_text_field={self.text_field!r} is not a column of "
                f"{self.where} (columns: {list(columns)})")

    @property
    def where(self) -> str:
        """The split, for messages: ``name/split``."""
        return f"{self.name or 'the dataset'}/{self.split}"

    @property
    def dataset(self):
        return self.splits[self.split]

    def fingerprint(self) -> Optional[str]:
        return getattr(self.dataset, "_fingerprint", None)

    def size_estimate(self) -> Optional[int]:
        ds = self.dataset
        data = getattr(ds, "data", None)
        if data is not None and hasattr(data, "nbytes"):
            return int(data.nbytes)
        splits = getattr(getattr(ds, "info", None), "splits", None) or {}
        info = splits.get(self.split) if hasattr(splits, "get") else None
        return int(info.num_bytes) if info is not None and info.num_bytes else None

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": f"{self.name}" + (f"/{self.config}" if self.config else ""),
                "hf_name": self.name, "hf_config": self.config, "split": self.split,
                "text_field": self.text_field, "documents": self.documents_mode,
                "streaming": self.streaming,
                "fingerprint": self.fingerprint()}

    def _batches(self) -> Iterator[dict]:
        """The split's rows in batches.  A stream learns its columns from its first file, so a
        later file with other columns (say, without the text field) fails only when it is read,
        with a ``datasets`` CastError: that becomes a message naming the field and the split.
        Any object with ``iter(batch_size=)`` serves; without ``datasets`` installed there is
        no CastError to catch."""
        try:
            from datasets.table import CastError
        except ImportError:
            CastError = ()  # an `except ()` clause catches nothing

        batches = iter(self.dataset.iter(batch_size=1000))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except CastError as e:
                raise DataConfigError(
                    f"{self.prefix}hf_text_field={self.text_field!r}: a file of {self.where} "
                    f"has the columns {list(e.table_column_names)}, not "
                    f"{list(e.requested_column_names)} as its first file; all of the split's "
                    "files need the same columns") from e
            yield batch

    def _texts(self) -> Iterator[str]:
        for batch in self._batches():
            if self.text_field not in batch:
                raise DataConfigError(self._missing_field(batch.keys()))
            for text in batch[self.text_field]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataConfigError(
                        f"{self.prefix}hf_text_field={self.text_field!r} of "
                        f"{self.where} holds {type(text).__name__}, not text")
                yield text

    def documents(self) -> Iterator[Piece]:
        limit = self.piece_chars
        if self.documents_mode == "rows":
            for text in self._texts():
                if text.strip():
                    yield from split_document(text, limit)
            return
        article: list[str] = []
        size = 0
        for row in self._texts():
            if is_wikitext_heading(row) and size and "".join(article).strip():
                yield from split_document("".join(article), limit)
                article, size = [], 0
            article.append(row or "\n")
            size += len(row) + 1
            if size > 64 * limit:
                raise DataConfigError(
                    f"{self.prefix}hf_documents='wikitext': no article heading (' = Title = ') "
                    f"in {size:,} characters of {self.where}; is this WikiText? "
                    "(use hf_documents='rows')")
        if "".join(article).strip():
            yield from split_document("".join(article), limit)


def is_wikitext_heading(row: str) -> bool:
    """WikiText's top-level heading row ``" = Title = \\n"`` (not ``" = = Section = = "``)."""
    body = row.rstrip("\n")
    return (body.startswith(" = ") and body.endswith(" = ") and len(body) > 6
            and body[3] != "=" and body[-4] != "=")


# ---------------------------------------------------------------------------------------------
# Tokenizers and encoders
# ---------------------------------------------------------------------------------------------

# The pattern of tokenizers' ByteLevel pre-tokenizer (use_regex=True), GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def is_byte_level_bpe(tok) -> bool:
    """Whether ``tok`` (a ``tokenizers.Tokenizer``) is what :class:`ByteLevelBPEEncoder`
    reproduces: no normalizer, ByteLevel pre-tokenization without prefix space with the GPT-2
    pattern, a BPE model without dropout, only special added tokens."""
    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space", True) and pre.get("use_regex", True)
            and model.get("type") == "BPE" and not model.get("dropout")
            and all(t.get("special") for t in spec.get("added_tokens") or []))


class HFEncoder:
    """Any ``tokenizers`` tokenizer: documents encoded as ordinary text (special-token strings
    inside a document are not matched), no template tokens."""

    def __init__(self, tok):
        self._tok = tok
        if hasattr(tok, "encode_special_tokens"):
            tok.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


# The same pattern for pure-ASCII text in the standard library's (faster) engine: there \p{L}
# is [A-Za-z], \p{N} is [0-9] and \s is [\t\n\v\f\r ] (checked at run time, see below).
_ASCII_SPACE = r"\t\n\x0b\x0c\r "
GPT2_ASCII_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+"""
                      rf"""| ?[^{_ASCII_SPACE}A-Za-z0-9]+"""
                      rf"""|[{_ASCII_SPACE}]+(?![^{_ASCII_SPACE}])|[{_ASCII_SPACE}]+""")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_BOUNDARY_AFTER = re.compile(r"[!-~](?=[\n ])")


def _last_boundary(text: str, lo: int, hi: int) -> int:
    """The largest i in (lo, hi] that :func:`cut_point` accepts (newline or space), or -1."""
    best = -1
    for ch in ("\n", " "):
        i = text.rfind(ch, lo + 1, hi + 1)
        while i > max(lo, best):
            if "!" <= text[i - 1] <= "~":
                best = i
                break
            i = text.rfind(ch, lo + 1, i)
    return best


class ByteLevelBPEEncoder(HFEncoder):
    """Exact and faster encoding for byte-level BPE tokenizers (:func:`is_byte_level_bpe`).

    The ids of a text are, word by word, the BPE model's ids of each pre-tokenized word.  This
    splits the text into words with the same pattern (:data:`GPT2_PATTERN`, in the ``regex``
    module; for stretches of pure ASCII between word boundaries, :data:`GPT2_ASCII_PATTERN` in
    ``re``, about 3× faster) and caches each word's ids.  The engines could classify a character
    differently (they ship different Unicode versions): each character is checked once by
    pre-tokenizing a probe string containing it with both ``tokenizers`` and the pattern, and a
    stretch containing a character on which they disagree is encoded by ``tokenizers`` itself.
    """

    CACHE_LIMIT = 1 << 20

    def __init__(self, tok):
        import regex
        from tokenizers import pre_tokenizers

        super().__init__(tok)
        self._model = tok.model
        self._pattern = regex.compile(GPT2_PATTERN)
        self._reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        alphabet = data_lib.bytes_to_unicode()
        self._to_byte = {c: b for b, c in alphabet.items()}
        self._table = {b: ord(c) for b, c in alphabet.items()}  # for str.translate of latin-1
        self._checked: set[str] = set()
        self._disagree: set[str] = set()
        self._cache: dict[str, list[int]] = {}
        ascii_chars = [chr(i) for i in range(128)]
        self._check(ascii_chars)
        ascii_pattern = re.compile(GPT2_ASCII_PATTERN)
        self._ascii = ascii_pattern if self._disagree.isdisjoint(ascii_chars) and all(
            ascii_pattern.findall(p) == self._reference_words(p)
            for p in map(self._probe, ascii_chars)) else None

    @staticmethod
    def _probe(ch: str) -> str:
        return f"x{ch} 1{ch} {ch}! {ch}{ch}\n"

    def _reference_words(self, text: str) -> list[str]:
        return [bytes(self._to_byte[c] for c in w).decode("utf-8")
                for w, _ in self._reference.pre_tokenize_str(text)]

    def _check(self, chars: Iterable[str]) -> None:
        for ch in chars:
            probe = self._probe(ch)
            if self._pattern.findall(probe) != self._reference_words(probe):
                self._disagree.add(ch)
            self._checked.add(ch)

    def _segments(self, text: str) -> Iterator[tuple[bool, str]]:
        """(is ASCII, stretch) between word boundaries; non-ASCII runs widened to the nearest
        boundaries on both sides."""
        if text.isascii():
            yield True, text
            return
        pos = 0
        for run in _NON_ASCII.finditer(text):
            if run.start() < pos:
                continue
            start = _last_boundary(text, pos, run.start())
            if start < 0:
                start = pos
            after = _BOUNDARY_AFTER.search(text, run.end())
            end = after.end() if after else len(text)
            if start > pos:
                yield True, text[pos:start]
            yield False, text[start:end]
            pos = end
        if pos < len(text):
            yield True, text[pos:]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for is_ascii, stretch in self._segments(text):
            if is_ascii and self._ascii is not None:
                self._extend(out, self._ascii.findall(stretch))
                continue
            chars = set(stretch)
            if not chars <= self._checked:
                self._check(chars - self._checked)
            if self._disagree.isdisjoint(chars):
                self._extend(out, self._pattern.findall(stretch))
            else:
                out.extend(super().encode(stretch))
        return out

    def _extend(self, out: list[int], words: list[str]) -> None:
        cache = self._cache
        if len(cache) > self.CACHE_LIMIT:
            cache.clear()
        get, tokenize, table, extend = cache.get, self._model.tokenize, self._table, out.extend
        for word in words:
            ids = get(word)
            if ids is None:
                mapped = word.encode("utf-8").decode("latin-1").translate(table)
                ids = cache[word] = [t.id for t in tokenize(mapped)]
            extend(ids)


class ChunkEncoder:
    """A list of pieces → their ids with EOS after each document's last piece."""

    def __init__(self, kind: str, tokenizer_json: str, eos_id: int, dtype: str):
        self.kind, self.eos_id, self.dtype = kind, eos_id, np.dtype(dtype)
        if kind == "hf":
            import tokenizers

            tok = tokenizers.Tokenizer.from_str(tokenizer_json)
            self._encoder = (ByteLevelBPEEncoder(tok) if is_byte_level_bpe(tok)
                             else HFEncoder(tok))

    def __call__(self, chunk: Sequence[Piece]) -> tuple[np.ndarray, int]:
        docs = sum(end for _, end in chunk)
        if self.kind == "bytes":
            parts = []
            for text, end in chunk:
                parts.append(np.frombuffer(text.encode("utf-8"), np.uint8).astype(self.dtype))
                if end:
                    parts.append(np.array([self.eos_id], self.dtype))
            return (np.concatenate(parts) if parts else np.zeros(0, self.dtype)), docs
        ids: list[int] = []
        for text, end in chunk:
            if text:
                ids.extend(self._encoder.encode(text))
            if end:
                ids.append(self.eos_id)
        return np.array(ids, dtype=self.dtype), docs


_WORKER_ENCODER: Optional[ChunkEncoder] = None


def _worker_init(args) -> None:
    global _WORKER_ENCODER
    os.environ["RAYON_NUM_THREADS"] = "1"  # parallelism comes from the processes
    _WORKER_ENCODER = ChunkEncoder(*args)


def _worker_encode(chunk):
    return _WORKER_ENCODER(chunk)


def fork_is_safe() -> bool:
    """Whether worker processes may be forked from this one: on a platform with ``fork``, and
    only while no JAX backend is running here (its threads do not survive a fork).  Forked
    workers start in milliseconds; spawned ones import the package (and JAX) again, about a
    second each."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    if "jax" not in sys.modules:
        return True
    try:
        from jax._src import xla_bridge

        return not xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # pragma: no cover - another JAX layout
        return False


class EncoderPool:
    """Encodes chunks in order: in this process (workers ≤ 1) or in ``workers`` processes
    (forked when :func:`fork_is_safe`, else spawned) with at most 2 × workers chunks in flight."""

    def __init__(self, workers: int, encoder_args: tuple):
        self.workers = max(int(workers), 1)
        self._local = ChunkEncoder(*encoder_args) if self.workers == 1 else None
        self._pool = None
        self.start_method = None
        if self.workers > 1:
            self.start_method = "fork" if fork_is_safe() else "spawn"
            if self.start_method == "fork":
                # tokenizers would warn that its (unused) thread pool is off in the children.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context(self.start_method),
                initializer=_worker_init, initargs=(encoder_args,))

    def map(self, chunks: Iterable[list[Piece]]) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yields (ids, documents, characters) per chunk, in order."""
        if self._pool is None:
            for chunk in chunks:
                ids, docs = self._local(chunk)
                yield ids, docs, sum(len(t) for t, _ in chunk)
            return
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((self._pool.submit(_worker_encode, chunk),
                            sum(len(t) for t, _ in chunk)))
            if len(pending) >= 2 * self.workers:
                future, chars = pending.popleft()
                yield (*future.result(), chars)
        while pending:
            future, chars = pending.popleft()
            yield (*future.result(), chars)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def chunked(pieces: Iterable[Piece], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[Piece]]:
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _unit_hash(i: int) -> float:
    digest = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8, key=b"umup-bpe").digest()
    return int.from_bytes(digest, "little") / 2.0**64


def bpe_sample(source, bound_chars: int, mode: str = "spread") -> tuple[list[str], dict]:
    """Whole train documents (as pieces) for BPE training; see the module docstring."""
    if mode not in BPE_SAMPLE_MODES:
        raise DataConfigError(f"--bpe_sample={mode!r} is invalid: use one of {BPE_SAMPLE_MODES}")
    size = source.size_estimate() if mode == "spread" else None
    rate = 1.0 if not size else min(1.0, bound_chars / size)
    texts, chars, doc, docs, take = [], 0, 0, 0, None
    for text, end in source.documents():
        if take is None:
            take = rate >= 1.0 or _unit_hash(doc) < rate
            docs += take
        if take:
            texts.append(text)
            chars += len(text)
        if end:
            doc, take = doc + 1, None
        if chars >= bound_chars:
            break
    return texts, {"mode": mode, "bound_chars": bound_chars, "rate": rate,
                   "split_size_estimate": size, "documents": docs, "chars": chars}


def parse_tokenizer(spec: str, field: str = "--tokenizer") -> tuple[str, Any]:
    """``bytes`` → ("bytes", None); ``bpe:N`` → ("bpe", N); ``path.json`` → ("file", path)."""
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            size = 0
        if size <= 257:
            raise DataConfigError(f"{field}={spec!r} is invalid: bpe:N needs N > 257 (256 bytes "
                                  "+ the end-of-text token + merges)")
        return "bpe", size
    path = pathlib.Path(os.path.expanduser(spec))
    if path.suffix == ".json":
        if not path.is_file():
            raise DataConfigError(f"{field}: {path} does not exist")
        return "file", path
    raise DataConfigError(
        f"{field}={spec!r} is invalid: use 'bytes', 'bpe:N' or a path to a tokenizer.json")


def build_tokenizer(spec: str, train, eos_token: str = data_lib.EOS_TOKEN,
                    bpe_sample_mb: float = BPE_SAMPLE_MB, bpe_sample_mode: str = "spread",
                    field: str = "--tokenizer") -> tuple[data_lib.HFTokenizer, str, dict]:
    """(tokenizer with ``eos_token``, encoder kind 'bytes' | 'hf', info for meta.json)."""
    kind, arg = parse_tokenizer(spec, field)
    if kind == "bytes":
        return data_lib.ByteTokenizer.as_hf(eos_token), "bytes", {"spec": "bytes"}
    if kind == "bpe":
        if not bpe_sample_mb > 0:
            raise DataConfigError(f"--bpe_sample_mb={bpe_sample_mb} is invalid: it must be > 0")
        t0 = time.time()
        texts, sample = bpe_sample(train, int(bpe_sample_mb * 1e6), bpe_sample_mode)
        if not texts:
            raise DataConfigError(
                f"the train split ({train.where}) has no text to train the BPE on")
        tok = data_lib.train_bpe(texts, arg, special_tokens=(eos_token,))
        sample["train_seconds"] = round(time.time() - t0, 2)
        if tok.vocab_size < arg:
            log.warning("the BPE has %d tokens, not %d: the sample has no more merges to make",
                        tok.vocab_size, arg)
        return tok, "hf", {"spec": spec, "bpe_sample": sample}
    try:
        tok = data_lib.HFTokenizer.from_file(arg)
    except Exception as e:
        raise DataConfigError(f"{field}: {arg} is not a readable tokenizer.json ({e})") from e
    check_ids_fit(tok, arg, field)
    info = {"spec": str(arg), "source_sha256": data_lib.sha256_file(arg)}
    if tok.token_id(eos_token) is None:
        tok.hf.add_special_tokens([eos_token])
        tok = data_lib.HFTokenizer(tok.hf, tok.name)
        info["eos_added"] = True
    return tok, "hf", info


def check_ids_fit(tok: data_lib.HFTokenizer, path, field: str = "--tokenizer") -> None:
    """Refuses a tokenizer whose ids have gaps: the vocabulary size (``get_vocab_size``, what
    the model's embedding gets) counts tokens, so a largest id ≥ that count would index past
    the embedding (and could overflow the bins' dtype, or collide with an added EOS id)."""
    ids = tok.hf.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= tok.vocab_size:
        raise DataConfigError(
            f"{field}: {path} has {tok.vocab_size} tokens but ids up to {top}: its ids must be "
            f"0 … {tok.vocab_size - 1} without gaps (the vocabulary size is the token count)")


# ---------------------------------------------------------------------------------------------
# Writing a prepared directory
# ---------------------------------------------------------------------------------------------


def _resolve(out: Union[str, pathlib.Path]) -> pathlib.Path:
    return pathlib.Path(os.path.expandvars(os.path.expanduser(str(out)))).absolute()


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataConfigError(f"--out={out} exists and is not a directory")
    contents = sorted(p.name for p in out.iterdir())
    if not contents:
        return
    if not overwrite:
        raise DataConfigError(
            f"--out={out} exists ({', '.join(contents)}); pass --overwrite to replace it")
    foreign = [name for name in contents if name not in PREPARED_FILES]
    if foreign:
        raise DataConfigError(
            f"--out={out} holds files prepare_data does not write ({', '.join(foreign)}); "
            "not replacing it, even with --overwrite")


def _install(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool, exist_ok: bool) -> bool:
    """Renames ``tmp`` to ``out``; returns False (and drops tmp) if ``exist_ok`` and another
    process made ``out`` meanwhile."""
    if out.exists() and any(out.iterdir()):
        if exist_ok and (out / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        _check_out(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return True
    if out.exists():
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        if exist_ok and (out / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    return True


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress_bar(enabled: bool, split: str, total: Optional[int]):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"tokenize {split}", unit="char", unit_scale=True,
                dynamic_ncols=True)


def write_split(pool: EncoderPool, source, path: pathlib.Path, progress: bool = False,
                split: str = "train") -> dict[str, int]:
    """Encodes ``source``'s documents into ``path``; returns its token and document counts."""
    tokens = docs = chars = 0
    bar = _progress_bar(progress, split, source.size_estimate())
    try:
        with open(path, "wb") as f:
            for ids, n_docs, n_chars in pool.map(chunked(source.documents())):
                ids.tofile(f)
                tokens, docs, chars = tokens + len(ids), docs + n_docs, chars + n_chars
                if bar is not None:
                    bar.update(n_chars)
                    bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if tokens == 0:
        raise DataConfigError(f"the {split} split ({source.where}) has no documents with text")
    return {"tokens": tokens, "documents": docs, "chars": chars}


def prepare(
    train,
    valid,
    tokenizer: str,
    out: Union[str, pathlib.Path],
    *,
    workers: int = 1,
    overwrite: bool = False,
    exist_ok: bool = False,
    eos_token: str = data_lib.EOS_TOKEN,
    bpe_sample_mb: float = BPE_SAMPLE_MB,
    bpe_sample_mode: str = "spread",
    progress: bool = False,
    command: str = "",
    tokenizer_field: str = "--tokenizer",
) -> dict[str, Any]:
    """Tokenizes the documents of ``train`` and ``valid`` (:class:`TextFiles` or
    :class:`HFSplit`) with ``tokenizer`` (``bytes``, ``bpe:N`` or a tokenizer.json) into the
    prepared directory ``out``; returns its meta.json.  With ``exist_ok`` an existing prepared
    ``out`` is kept (and its meta returned) instead of refused."""
    out = _resolve(out)
    if exist_ok and (out / "meta.json").is_file():
        return json.loads((out / "meta.json").read_text())
    _check_out(out, overwrite)
    train.check()
    valid.check()
    parse_tokenizer(tokenizer, tokenizer_field)
    t_start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        tok, kind, tok_info = build_tokenizer(tokenizer, train, eos_token, bpe_sample_mb,
                                              bpe_sample_mode, tokenizer_field)
        eos_id, vocab = tok.token_id(eos_token), tok.vocab_size
        dtype = data_lib.bin_dtype_for(vocab)
        tok_bytes = tok.to_json().encode("utf-8")
        (tmp / "tokenizer.json").write_bytes(tok_bytes)
        t_encode = time.time()
        # Bytes are a copy per character: worker processes would only add their start-up.
        pool = EncoderPool(workers if kind == "hf" else 1,
                           (kind, tok.to_json() if kind == "hf" else "", eos_id, dtype))
        try:
            splits = {}
            for split, source in (("train", train), ("valid", valid)):
                counts = write_split(pool, source, tmp / f"{split}.bin", progress, split)
                splits[split] = {"file": f"{split}.bin", **counts}
        finally:
            pool.close()
        encode_s = time.time() - t_encode
        total = sum(s["tokens"] for s in splits.values())
        described = {"train": train.describe(), "valid": valid.describe()}
        meta = {
            "format": data_lib.PREPARED_FORMAT,
            "vocab_size": vocab,
            "dtype": dtype,
            "eos_token": eos_token,
            "eos_id": eos_id,
            "splits": splits,
            "tokens": total,
            "documents": sum(s["documents"] for s in splits.values()),
            "source": {"kind": described["train"]["kind"], "name": described["train"]["name"],
                       **described},
            "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256(tok_bytes).hexdigest(),
                          **tok_info},
            "command": command,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "workers": pool.workers,
            "start_method": pool.start_method,
            "seconds": {"total": round(time.time() - t_start, 2), "encode": round(encode_s, 2)},
            "tokens_per_second": round(total / max(encode_s, 1e-9)),
            "versions": _versions(),
        }
        for name in ("tokenizer.json", "train.bin", "valid.bin"):
            _fsync(tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync(tmp / "meta.json")
        if not _install(tmp, out, overwrite, exist_ok):
            return json.loads((out / "meta.json").read_text())
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _versions() -> dict[str, str]:
    import tokenizers

    import umup_jax

    return {"umup_jax": umup_jax.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------
# data.source = "hf": prepared once into the cache
# ---------------------------------------------------------------------------------------------


def _training_tokenizer_spec(cfg) -> tuple[str, str]:
    """config.data.tokenizer → (prepare_data spec, its identity for the cache key)."""
    if cfg.tokenizer == "bytes":
        return "bytes", "bytes"
    if cfg.tokenizer == "bpe":
        return f"bpe:{cfg.vocab_size}", f"bpe:{cfg.vocab_size}"
    kind, path = parse_tokenizer(cfg.tokenizer, "data.tokenizer")
    return str(path), data_lib.sha256_file(path)


def prepare_hf_cached(cfg, cache_dir: pathlib.Path, make: bool = True) -> pathlib.Path:
    """``data.source='hf'``: the prepared directory of (dataset, splits, text field, documents,
    tokenizer) in ``cache_dir/prepared/``, made on first use, streaming the dataset when
    ``data.hf_streaming`` (a ``save_to_disk`` directory is read from disk either way).

    The directory's key holds :func:`hf_data_identity`, not ``data.hf_streaming``: streamed
    or downloaded, the rows and so the tokens are the same, and one cache entry serves both.
    The identity is resolved before any data is read, so a cached entry is used without
    streaming or downloading the dataset again.  ``make=False``: a missing entry is a
    :class:`~umup_jax.data.DataConfigError` instead of being made (a finished run's rerun
    compares its tokens only if they are at hand)."""
    data_lib.check_distinct_splits(cfg.hf_train_split, cfg.hf_valid_split,
                                   "data.hf_train_split", "data.hf_valid_split")
    spec, identity = _training_tokenizer_spec(cfg)
    key = hashlib.sha256(json.dumps([
        "hf-prepared-v2", cfg.hf_name, cfg.hf_config, cfg.hf_train_split, cfg.hf_valid_split,
        cfg.hf_text_field, cfg.hf_documents, identity, data_lib.EOS_TOKEN, BPE_SAMPLE_MB,
        hf_data_identity(cfg.hf_name, cfg.hf_config, prefix="data."),
    ]).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   pathlib.Path(cfg.hf_name).name)[:40]
    out = pathlib.Path(cache_dir) / "prepared" / f"hf-{stem}-{key}"
    if (out / "meta.json").is_file():
        return out
    if not make:
        raise data_lib.DataConfigError(
            f"data.hf_name={cfg.hf_name!r} is not prepared in {out.parent} (prepare=False)")
    streaming = bool(cfg.hf_streaming)
    splits = open_hf(cfg.hf_name, cfg.hf_config, streaming=streaming, prefix="data.")
    common = dict(text_field=cfg.hf_text_field, documents_mode=cfg.hf_documents,
                  name=cfg.hf_name, config=cfg.hf_config, prefix="data.", streaming=streaming)
    train = HFSplit(splits, cfg.hf_train_split, split_field="data.hf_train_split", **common)
    valid = HFSplit(splits, cfg.hf_valid_split, split_field="data.hf_valid_split", **common)
    train.check()
    valid.check()
    size = train.size_estimate() or 0
    workers = min(_available_cpus(), 8) if size > 32e6 else 1
    prepare(train, valid, spec, out, workers=workers, exist_ok=True, progress=True,
            command=f"data.source=hf, data.hf_name={cfg.hf_name!r}",
            tokenizer_field="data.tokenizer")
    return out


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def define_flags() -> None:
    """The command line's flags (defined only when this module is the entry point)."""
    from absl import flags

    flags.DEFINE_enum("source", "text", ["text", "hf"], "Where the documents come from.")
    flags.DEFINE_list("train_files", [], "--source=text: train files or globs, comma-separated.")
    flags.DEFINE_list("valid_files", [], "--source=text: validation files or globs.")
    flags.DEFINE_string("doc_separator", "\\n\\f\\n",
                        "--source=text: the string between documents in a file (Python "
                        "escapes; empty: one document per file).")
    flags.DEFINE_string("hf_name", "", "--source=hf: dataset name, or a save_to_disk directory.")
    flags.DEFINE_string("hf_config", "", "--source=hf: dataset configuration.")
    flags.DEFINE_string("hf_train_split", "train", "--source=hf: the train split's name.")
    flags.DEFINE_string("hf_valid_split", "validation",
                        "--source=hf: the validation split's name (some datasets: test).")
    flags.DEFINE_string("hf_text_field", "text", "--source=hf: the column holding the text.")
    flags.DEFINE_enum("hf_documents", "rows", list(HF_DOCUMENTS),
                      "--source=hf: rows (each row a document) or wikitext (rows grouped into "
                      "articles at ' = Title = ' rows).")
    flags.DEFINE_bool("hf_streaming", True, "--source=hf: stream instead of downloading it "
                      "whole into the Hugging Face cache first.")
    flags.DEFINE_string("tokenizer", "bpe:32000", "bytes | bpe:N | path/to/tokenizer.json")
    flags.DEFINE_string("eos_token", data_lib.EOS_TOKEN, "The document separator token.")
    flags.DEFINE_float("bpe_sample_mb", BPE_SAMPLE_MB,
                       "bpe:N: train on at most this many million characters of train text.")
    flags.DEFINE_enum("bpe_sample", "spread", list(BPE_SAMPLE_MODES),
                      "bpe:N: spread (hash-selected documents over the whole split) or head.")
    flags.DEFINE_string("out", None, "The directory to write (must not exist, or --overwrite).")
    flags.DEFINE_integer("workers", _available_cpus(), "Encoding processes.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing prepared --out.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.mark_flag_as_required("out")


def sources_from_flags(FLAGS) -> tuple[Any, Any]:
    if FLAGS.source == "text":
        sep = decode_escapes(FLAGS.doc_separator)
        return (TextFiles(FLAGS.train_files, sep, "--train_files"),
                TextFiles(FLAGS.valid_files, sep, "--valid_files"))
    data_lib.check_distinct_splits(FLAGS.hf_train_split, FLAGS.hf_valid_split,
                                   "--hf_train_split", "--hf_valid_split")
    splits = open_hf(FLAGS.hf_name, FLAGS.hf_config, FLAGS.hf_streaming)
    common = dict(text_field=FLAGS.hf_text_field, documents_mode=FLAGS.hf_documents,
                  name=FLAGS.hf_name, config=FLAGS.hf_config, streaming=FLAGS.hf_streaming)
    return (HFSplit(splits, FLAGS.hf_train_split, split_field="--hf_train_split", **common),
            HFSplit(splits, FLAGS.hf_valid_split, split_field="--hf_valid_split", **common))


def check_disjoint_files(train, valid) -> None:
    if isinstance(train, TextFiles) and isinstance(valid, TextFiles):
        both = {p.resolve() for p in train.paths()} & {p.resolve() for p in valid.paths()}
        if both:
            raise DataConfigError(
                f"--train_files and --valid_files share {len(both)} file(s), e.g. "
                f"{sorted(both)[0]}: the validation split must be held out")


def main() -> None:
    from absl import flags

    from umup_jax import cli, failures

    FLAGS = flags.FLAGS
    command = "python -m umup_jax.prepare_data " + shlex.join(sys.argv[1:])
    with failures.exit_on_failure(None), cli.usage_errors():
        train, valid = sources_from_flags(FLAGS)
        check_disjoint_files(train, valid)
        meta = prepare(train, valid, FLAGS.tokenizer, FLAGS.out, workers=FLAGS.workers,
                       overwrite=FLAGS.overwrite, eos_token=FLAGS.eos_token,
                       bpe_sample_mb=FLAGS.bpe_sample_mb, bpe_sample_mode=FLAGS.bpe_sample,
                       progress=FLAGS.progress, command=command)
    s = meta["splits"]
    print(f"prepared {_resolve(FLAGS.out)}: vocab {meta['vocab_size']} ({meta['dtype']}), "
          f"train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} documents, "
          f"valid {s['valid']['tokens']:,} tokens / {s['valid']['documents']:,} documents; "
          f"encoded at {meta['tokens_per_second']:,} tokens/s with {meta['workers']} worker(s), "
          f"{meta['seconds']['total']:.1f}s in all")


if __name__ == "__main__":
    from absl import app, flags

    from umup_jax import cli

    define_flags()
    entry, parse = cli.app_main(main, flags.FLAGS)
    app.run(entry, flags_parser=parse)
