"""One command line for every workflow runner: `--config FILE` plus `--section.field VALUE`
overrides of the workflow's dataclasses, `--help` generated from those dataclasses (every
field, its default, one line of help), `--print-config` (print the resolved config as
JSON and exit).

A field's help is its `metadata["help"]`, else the comment on its line (and the
`#   ...` continuation lines under it), else the comment block just above it: the
dataclass source is the one place it is written, so the listing cannot drift from it.

Old dash flags of a runner stay as aliases for one release: each maps to one field (or
a switch) and prints a one-line deprecation warning naming the new spelling."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from dataclasses import dataclass, field

from engine.config import parse_overrides

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:")


def field_help(cls) -> dict[str, str]:
    """{field: one line of help} from metadata or the class source's comments (a
    subclass's fields from its own source, inherited ones from its bases')."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_help(base))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def _own_help(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}           # line index -> comment text (after "#")
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0] - 1] = tok.string[1:]
    except (tokenize.TokenError, IndentationError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    i = 0
    while i < len(lines):
        m = _FIELD_LINE.match(lines[i])
        own = lines[i].lstrip().startswith("#")
        if m and m.group(1) in names and m.group(1) not in out and not own:
            text = []
            if i in comments:
                text.append(comments[i].strip())
                # continuation: a comment-only line whose text is indented ("#    more")
                while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("#") \
                        and comments.get(i + 1, "").startswith("  "):
                    i += 1
                    text.append(comments[i].strip())
            out[m.group(1)] = " ".join(t for t in (text or above) if t)
            above = []
        elif own:
            above.append(comments.get(i, "").strip())
        else:
            above = []
        i += 1
    return out


def _type_name(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace("typing.", "").replace(" | None", "")
    m = re.fullmatch(r"Optional\[(.*)\]", t)
    return m.group(1) if m else t


def _metavar(f) -> str:
    """INT, STR, ...; a list field: A,B,... (comma-separated on the command line)."""
    t = _type_name(f)
    return "A,B,..." if t.startswith(("list", "tuple")) else t.upper()


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@dataclass
class Alias:
    """An old flag: `--data-dir X` is `--data.dir X`; a switch (`--paper-rule`) sets the
    field to `value`; many=True: the old nargs="+" form (`--arch 80 90`), its words up to
    the next dash flag joined into one comma-separated list; more: fields taking the
    values after the first (`--to-chatglm SRC OUT`); sets: fields it also fixes. A key
    that starts with "--" is a flag of the new spelling (`--overwrite` is `--force`)."""
    key: str
    switch: bool = False
    value: object = True
    many: bool = False
    more: tuple = ()
    sets: dict = field(default_factory=dict)


@dataclass
class Command:
    """A runner's command line. sections: {name: dataclass} listed in --help; build(base,
    overrides) -> the resolved config (with .to_dict()); flags: {--name: help} switches
    that say how to run (--resume, --force), not what; aliases: {old flag: Alias};
    extra_fields: {section: {name: help}} listed options that are not dataclass fields
    (model.preset)."""
    doc: str
    sections: dict
    build: object
    flags: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    extra_fields: dict = field(default_factory=dict)
    positional_alias: tuple = ()     # (section.field, choices): an old positional word
    refused_sections: tuple = ()     # build() refuses these itself, with a better message
    # "section.field" (a list field) that collects the bare words of the command line
    # (translate's sentences); "--" ends the options, so a word may start with a dash
    positional: str = ""

    def parser(self) -> argparse.ArgumentParser:
        head, _, rest = self.doc.strip().partition("\n\n")
        if self.aliases or self.positional_alias:
            old = [f"{k} = {_new_spelling(a)}" for k, a in self.aliases.items()]
            if self.positional_alias:
                old.insert(0, f"{' | '.join(self.positional_alias[1])} (positional) = "
                              f"--{self.positional_alias[0]} ...")
            rest += ("\n\n" if rest else "") + ("deprecated spellings (kept for one "
                                                "release; each prints a warning):\n  "
                                                + "\n  ".join(old))
        usage = ("%(prog)s [--config FILE] [--section.field VALUE ...] [--print-config]"
                 + "".join(f" [{f}]" for f in self.flags)
                 + (f" [{self.positional.split('.')[-1].upper()} ...]"
                    if self.positional else ""))
        p = argparse.ArgumentParser(
            usage=usage, description=head, epilog=rest or None, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", help="JSON or YAML file with the sections "
                       "below; --section.field VALUE overrides it")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as JSON and exit (runs nothing)")
        for flag, text in self.flags.items():
            p.add_argument(flag, action="store_true", help=text)
        for name, cls in self.sections.items():
            g = p.add_argument_group(f"{name} ({cls.__name__})")
            for fname, text in self.extra_fields.get(name, {}).items():
                g.add_argument(f"--{name}.{fname}", dest=f"{name}.{fname}", metavar="VALUE",
                               default=argparse.SUPPRESS, help=text.replace("%", "%%"))
            helps = field_help(cls)
            for f in dataclasses.fields(cls):
                d = _default(f)
                text = helps.get(f.name, "")
                g.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}",
                               metavar=_metavar(f), default=argparse.SUPPRESS,
                               help=f"{text} (default: {json.dumps(d)})".lstrip()
                               .replace("%", "%%"))
        return p

    def _translate(self, argv: list[str]) -> list[str]:
        """Old spellings -> --section.field VALUE, one warning each."""
        out, i = [], 0
        if self.positional_alias and argv and argv[0] in self.positional_alias[1]:
            key = self.positional_alias[0]
            _warn(f"the positional {argv[0]!r}", f"--{key} {argv[0]}")
            out += [f"--{key}", argv[0]]
            i = 1
        while i < len(argv):
            arg = argv[i]
            name, eq, val = arg.partition("=")
            a = self.aliases.get(name)
            if a is None:
                out.append(arg)
                i += 1
                continue
            if a.key.startswith("--"):
                new = [a.key]
                i += 1
            elif a.switch:
                new = [f"--{a.key}", json.dumps(a.value)]
                i += 1
            elif a.many and not eq:
                j = i + 1
                while j < len(argv) and not argv[j].startswith("--"):
                    j += 1
                if j == i + 1:
                    raise ValueError(f"{name} has no value")
                new = [f"--{a.key}", ",".join(argv[i + 1:j])]
                i = j
            elif a.more:
                vals = argv[i + 1:i + 2 + len(a.more)]
                if eq or len(vals) < 1 + len(a.more):
                    raise ValueError(f"{name} takes {1 + len(a.more)} values")
                new = [x for k, v in zip((a.key,) + a.more, vals) for x in (f"--{k}", v)]
                i += 2 + len(a.more)
            else:
                if not eq:
                    if i + 1 >= len(argv):
                        raise ValueError(f"{name} has no value")
                    val = argv[i + 1]
                new = [f"--{a.key}", val]
                i += 1 if eq else 2
            for k, v in a.sets.items():
                new += [f"--{k}", json.dumps(v)]
            _warn(name, _new_spelling(a))
            out += new
        return out

    def main(self, run, argv: list[str] | None = None, training: bool = False):
        """A runner's whole command line: parse argv, then run(config, **flags) (each flag
        a keyword: --resume -> resume=True); bad input, and a diverged training run, end
        as one line (engine/errors.py), never a traceback. -> run's result (an int is
        the exit code)."""
        from engine.errors import fail
        from engine.train.divergence import DivergenceError
        del training     # the flags say it now; kept for the callers that pass it
        try:
            config, flags = self.parse(argv)
            if config is None:   # --help / --print-config
                return 0
            return run(config, **{_dest(f): getattr(flags, _dest(f)) for f in self.flags})
        except (ValueError, DivergenceError) as e:
            fail(e)

    def parse(self, argv: list[str] | None):
        """-> (config, flags) or (None, None) after --print-config."""
        from engine.config import load_file
        argv = list(sys.argv[1:] if argv is None else argv)
        if "-h" in argv or "--help" in argv:
            self.parser().print_help()
            raise SystemExit(0)
        argv = self._translate(argv)
        p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        p.add_argument("--config")
        p.add_argument("--print-config", action="store_true")
        for flag in self.flags:
            p.add_argument(flag, action="store_true")
        words: list[str] = []
        if "--" in argv:             # after "--": bare words only
            k = argv.index("--")
            argv, words = argv[:k], argv[k + 1:]
        args, rest = p.parse_known_args(argv)
        rest, bare = _split_bare(rest)
        words = bare + words
        if words and not self.positional:
            raise ValueError(f"unrecognised argument {words[0]!r}: overrides look like "
                             "--section.field value")
        overrides = _lists_split(parse_overrides(rest), self.sections)
        if words:
            section, name = self.positional.split(".", 1)
            if name in overrides.get(section, {}):
                raise ValueError(f"give {self.positional} or bare words, not both")
            overrides.setdefault(section, {})[name] = words
        base = load_file(args.config) if args.config else {}
        unknown = sorted((set(base) | set(overrides)) - set(self.sections)
                         - set(self.refused_sections))
        if unknown:
            raise ValueError(f"unknown config section(s) {', '.join(unknown)}; this command "
                             f"takes {', '.join(self.sections)}")
        config = self.build(base, overrides)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=1))
            return None, args
        return config, args


def _lists_split(overrides: dict, sections: dict) -> dict:
    """A list field's command-line value: "80,90" -> [80, 90], "a" -> ["a"], 80 (one
    value, already parsed) -> [80], "" -> []; a JSON list ("[80, 90]") is one already.
    A config file writes its lists as JSON lists."""
    for name, values in overrides.items():
        cls = sections.get(name)
        if not dataclasses.is_dataclass(cls) or not isinstance(values, dict):
            continue
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            t = hints.get(key)
            kinds = {typing.get_origin(a) or a for a in typing.get_args(t)} | {
                typing.get_origin(t) or t}
            if not kinds & {list, tuple} or isinstance(value, (list, tuple)) or value is None:
                continue
            if isinstance(value, str):
                values[key] = [_word(w) for w in value.split(",") if w.strip()]
            else:
                values[key] = [value]
    return overrides


def _word(text: str):
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return text.strip()


def _split_bare(args: list[str]) -> tuple[list[str], list[str]]:
    """(options with their values, bare words): an option without "=" takes the next
    word as its value."""
    opts, bare, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--"):
            take = 1 if "=" in args[i] else 2
            opts += args[i:i + take]
            i += take
        else:
            bare.append(args[i])
            i += 1
    return opts, bare


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _new_spelling(a: Alias) -> str:
    if a.key.startswith("--"):
        return a.key
    if a.switch:
        return f"--{a.key} {json.dumps(a.value)}"
    new = f"--{a.key}" + (" A,B,..." if a.many else "")
    new += "".join(f" ... --{k}" for k in a.more)
    return new + "".join(f" --{k} {json.dumps(v)}" for k, v in a.sets.items())


def _warn(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


class Sections:
    """A runner's resolved config: one dataclass per section, as attributes."""

    def __init__(self, **sections):
        self.__dict__.update(sections)

    def to_dict(self) -> dict:
        return {k: dataclasses.asdict(v) for k, v in self.__dict__.items()}


def sections_builder(sections: dict):
    """build(base, overrides) for a Command whose sections are plain dataclasses: each
    from its file values updated by its overrides, unknown fields refused."""
    def build(base: dict, overrides: dict) -> Sections:
        return Sections(**{name: build_section(cls, name, {**base.get(name, {}),
                                                            **overrides.get(name, {})})
                           for name, cls in sections.items()})
    return build


def command(doc: str, sections: dict, **kw) -> Command:
    """A Command over plain dataclass sections (sections_builder)."""
    return Command(doc, sections, sections_builder(sections), **kw)


def build_section(cls, section: str, values: dict):
    """One dataclass from its merged file + override values, unknown fields refused."""
    from engine.config_check import check_fields
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"unknown {section} field(s): {', '.join(bad)}")
    return cls(**check_fields(cls, values, section))
