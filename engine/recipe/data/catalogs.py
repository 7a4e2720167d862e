"""English/Chinese pairs from the zh_CN gettext catalogues already on the machine.

Where they live: the system locale folders, vim's `lang/` folder, and the locale
folders inside installed Python packages. Everything is found and parsed at run time
(never committed): `find_catalogs()` -> `extract_pairs()`.

The `.mo` format (GNU gettext manual, "The Format of GNU MO Files"): a 28-byte header
  magic 0x950412de (byte order of the file), revision, N, O, T, hash size, hash offset
then two tables of N (length, offset) uint32 pairs at O (msgids) and T (msgstrs). A msgid
may be "context\\x04id" and "id\\x00plural"; a msgstr holds its plural forms separated by
NUL. The entry with the empty msgid is the header, which names the charset.
"""
from __future__ import annotations

import os
import re
import site
import struct
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

MO_MAGIC = 0x950412DE
MAX_CHARS = 300

# a path component naming simplified Chinese: zh_CN, zh_CN.UTF-8, zh_CN.cp936, zh-Hans...
ZH_DIR = re.compile(r"^zh[_-](cn|hans)([._@-].*)?$", re.IGNORECASE)
# CJK unified ideographs (+ extension A, compatibility, extensions B..): "has Chinese"
CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
LATIN = re.compile("[A-Za-z]")
SPACE = re.compile(r"\s+")


# ---- the .mo format ----------------------------------------------------------------
@dataclass
class MoEntry:
    msgid: str
    msgstr: str                 # the first plural form for plural entries
    context: str | None = None
    msgid_plural: str | None = None


def _charset(header: bytes) -> str:
    m = re.search(rb"charset=([A-Za-z0-9_.:-]+)", header)
    name = m.group(1).decode("ascii") if m else "utf-8"
    # "CHARSET" is the unfilled template value; gettext treats it as ASCII/UTF-8
    return "utf-8" if name.upper() == "CHARSET" else name


def parse_mo(data: bytes, name: str = "<bytes>") -> list[MoEntry]:
    """Every entry of a compiled catalogue except the header. Raises a one-line
    ValueError naming `name` when the bytes are not a well-formed .mo file."""
    if len(data) < 28:
        raise ValueError(f"{name}: not a .mo file ({len(data)} bytes, header needs 28)")
    for order in ("<", ">"):
        if struct.unpack(order + "I", data[:4])[0] == MO_MAGIC:
            break
    else:
        raise ValueError(f"{name}: not a .mo file (bad magic {data[:4].hex()})")
    revision, n, o_table, t_table = struct.unpack(order + "4I", data[4:20])
    if revision >> 16 > 1:
        raise ValueError(f"{name}: unsupported .mo major revision {revision >> 16}")
    if max(o_table, t_table) + 8 * n > len(data):
        raise ValueError(f"{name}: truncated .mo file (string tables run past the end)")

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack_from(order + "2I", data, table + 8 * i)
        if offset + length > len(data):
            raise ValueError(f"{name}: truncated .mo file (string {i} runs past the end)")
        return data[offset:offset + length]

    raw = [(string(o_table, i), string(t_table, i)) for i in range(n)]
    header = next((s for k, s in raw if k == b""), b"")
    charset = _charset(header)
    try:
        "".encode(charset)
    except LookupError:
        raise ValueError(f"{name}: unknown charset {charset!r} in the .mo header") from None

    entries = []
    for key, value in raw:
        if key == b"":
            continue  # the header (metadata, not a message)
        try:
            key_s, value_s = key.decode(charset), value.decode(charset)
        except UnicodeDecodeError:
            continue  # one mis-encoded message should not cost the whole catalogue
        context = None
        if "\x04" in key_s:
            context, key_s = key_s.split("\x04", 1)
        msgid, _, plural = key_s.partition("\x00")
        entries.append(MoEntry(msgid=msgid, msgstr=value_s.split("\x00")[0],
                               context=context, msgid_plural=plural or None))
    return entries


# ---- cleaning ------------------------------------------------------------------------
def clean_pair(english: str, chinese: str, max_chars: int = MAX_CHARS):
    """Normalised (english, chinese), or None when the pair is not usable training data.

    Whitespace runs (newlines, tabs) collapse to one space. Placeholders (%s, %1$s, {0},
    %(name)s) are left byte-for-byte: the model must learn to copy them. Accelerator
    markers (`_File` / `文件(_F)`, `&Open`) are left as well: stripping them safely needs
    the toolkit's rules (a `_` is just as often part of an identifier such as `max_size`),
    and the `(_F)` suffix is how zh_CN catalogues really render them.
    """
    en = SPACE.sub(" ", english).strip()
    zh = SPACE.sub(" ", chinese).strip()
    if not en or not zh or en == zh:
        return None                       # empty or untranslated
    if len(en) > max_chars or len(zh) > max_chars:
        return None                       # paragraphs of help text, not UI strings
    if not CJK.search(zh):
        return None                       # "translation" that kept the English or only symbols
    if CJK.search(en) or not LATIN.search(en):
        return None                       # the msgid must be English text
    return en, zh


# ---- finding catalogues ----------------------------------------------------------------
@dataclass(frozen=True)
class Catalog:
    name: str      # file stem, e.g. "wget-gnulib"
    group: str     # catalogue family the test split holds out together, e.g. "wget"
    path: Path


def catalog_group(name: str) -> str:
    """Family of a catalogue: "wget-gnulib" -> "wget", "psql-15" -> "psql",
    "man-db-gnulib" -> "man-db"; gnulib siblings and versioned copies go together."""
    group = name.lower()
    group = re.sub(r"[-_]gnulib$", "", group)
    group = re.sub(r"-\d+(\.\d+)*$", "", group)
    return group


def default_roots() -> list[Path]:
    """Folders that may hold zh_CN catalogues on this machine (only existing ones)."""
    roots = [Path(p) for p in ("/usr/share/locale", "/usr/share/locale-langpack",
                               "/usr/local/share/locale", "/usr/lib/locale", "/usr/share/vim")]
    roots.append(Path(sys.prefix) / "share" / "locale")
    # Python packages that ship translations (sphinx, django, jupyterlab language packs)
    packages = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"]}
    if site.ENABLE_USER_SITE:
        packages.add(site.getusersitepackages())
    roots += sorted(Path(p) for p in packages)
    seen, out = set(), []
    for r in roots:
        if r.is_dir() and r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def find_catalogs(roots: list[str | os.PathLike] | None = None) -> list[Catalog]:
    """Every `*.mo` under `roots` that sits below a simplified-Chinese folder
    (zh_CN*, zh_Hans*), one per real file, sorted by (name, path) for determinism."""
    roots = default_roots() if roots is None else [Path(r) for r in roots]
    found: dict[Path, Catalog] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            in_zh = any(ZH_DIR.match(part) for part in here.relative_to(root).parts) \
                or ZH_DIR.match(Path(root).name)
            if not in_zh:
                continue
            for fn in sorted(filenames):
                if fn.endswith(".mo"):
                    path = here / fn
                    stem = fn[:-3]
                    found.setdefault(path.resolve(), Catalog(stem, catalog_group(stem), path))
    return sorted(found.values(), key=lambda c: (c.name, str(c.path)))


# ---- extraction ----------------------------------------------------------------------
@dataclass
class Pair:
    english: str
    chinese: str
    sources: list[str] = field(default_factory=list)   # catalogue names holding this pair

    @property
    def source(self) -> str:
        return self.sources[0]

    @property
    def groups(self) -> set[str]:
        return {catalog_group(s) for s in self.sources}


def extract_pairs(catalogs: list[Catalog]) -> tuple[list[Pair], dict[str, int]]:
    """Cleaned pairs deduplicated by (english, chinese), in first-seen order, each with
    every catalogue it came from; plus the number of distinct pairs per catalogue name
    (vim ships the same catalogue in three encodings: counted once). A corrupt catalogue
    is skipped with a warning: one broken system file must not stop data preparation."""
    pairs: dict[tuple[str, str], Pair] = {}
    per_catalog: dict[str, set] = {}
    for cat in catalogs:
        try:
            entries = parse_mo(cat.path.read_bytes(), str(cat.path))
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping catalogue: {e}", stacklevel=2)
            continue
        seen = per_catalog.setdefault(cat.name, set())
        for e in entries:
            cleaned = clean_pair(e.msgid, e.msgstr)
            if cleaned is None:
                continue
            seen.add(cleaned)
            pair = pairs.setdefault(cleaned, Pair(*cleaned))
            if cat.name not in pair.sources:
                pair.sources.append(cat.name)
    return list(pairs.values()), {name: len(s) for name, s in per_catalog.items()}
