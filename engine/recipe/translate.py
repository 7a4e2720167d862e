"""English -> Chinese from any checkpoint: load once, translate lists of sentences in
batches on the KV cache (greedy, beam search or sampling), or answer a prompt loop.

    tr = Translator.load("runs/demo/translate/checkpoint")
    tr.translate(["File not found", "Save changes?"])            # -> ["...", "..."]

A checkpoint is a native directory (meta.json; a run's out_dir works too, its
`checkpoint` link is followed) or a ChatGLM2/3-format directory as published
(config.json + *.safetensors + tokenizer.model), read directly with model/convert.py.
Sentences are decoded longest first in batches of similar length (less padding), and
returned in input order; an empty line translates to an empty line.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from engine.progress import Progress
from engine.recipe.evaluate import translate as decode_batches
from model.generate import GenerationConfig


@dataclass
class TranslateStats:
    sentences: int = 0
    seconds: float = 0.0          # decoding only (not loading)
    generated_tokens: int = 0
    truncated: list = field(default_factory=list)   # input line numbers (0-based) cut

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def resolve_checkpoint(path: str) -> str:
    """`path` itself, or a run directory's `checkpoint` (the newest save)."""
    if (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.json"))
            and os.path.isfile(os.path.join(path, "checkpoint", "meta.json"))):
        return os.path.join(path, "checkpoint")
    return path


def _is_chatglm_dir(path: str) -> bool:
    from engine.train.checkpoint import _looks_like_chatglm
    return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.json"))
            and _looks_like_chatglm(path))


def load_model(path: str, tokenizer: str | None = None, device="cpu",
               dtype: torch.dtype | None = None):
    """(model, tokenizer, source description) for decoding; a bad path, a partial save or
    a tokenizer that does not belong to the checkpoint is a one-line ValueError."""
    from model import GLM, GLMConfig
    from model.tokenizer import load_tokenizer
    path = resolve_checkpoint(path)
    if _is_chatglm_dir(path):
        from model.convert import load_chatglm
        tok_path = tokenizer or os.path.join(path, "tokenizer.model")
        if not os.path.isfile(tok_path):
            raise ValueError(f"{path} is a ChatGLM-format directory without tokenizer.model: "
                             "pass --translate.tokenizer PATH")
        tok = load_tokenizer(tok_path)
        model = load_chatglm(path, device=device, dtype=dtype)
        return model.eval(), tok, f"{path} (ChatGLM format)"
    from engine.train import checkpoint as ckpt_lib
    ckpt = ckpt_lib.Checkpoint(path)
    tok_path = tokenizer or os.path.join(path, ckpt_lib.TOKENIZER_FILE)
    tok = load_tokenizer(tok_path)
    ckpt.check_tokenizer(tok.sha256, tok_path)
    try:
        cfg = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    except (KeyError, TypeError):
        raise ckpt_lib.CheckpointError(f"checkpoint {path} has no model config in "
                                       "meta.json") from None
    model = GLM.build(cfg, device=device)
    ckpt_lib.load_model_weights(model, ckpt)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), tok, f"{path} (step {ckpt.meta['step']})"


class Translator:
    def __init__(self, model, tok, source: str = "", max_source: int = 96):
        self.model, self.tok, self.source = model, tok, source
        self.max_source = max_source
        self.stats = TranslateStats()

    @classmethod
    def load(cls, path: str, tokenizer: str | None = None, device=None, dtype=None,
             max_source: int = 96) -> "Translator":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, source = load_model(path, tokenizer, device, dtype)
        return cls(model, tok, source, max_source)

    def translate(self, sentences: list[str], gen: GenerationConfig | None = None,
                  batch_size: int = 32, progress: bool | Progress = False) -> list[str]:
        """One Chinese line per English line, in input order. gen: mode, max_new_tokens,
        num_beams, temperature, top_k, top_p, seed, length_penalty (vocab_size is the
        tokenizer's). progress: True prints a line at most every 10 s to stderr."""
        gen = gen or GenerationConfig(max_new_tokens=64)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        clean = [" ".join(s.split()) for s in sentences]   # newlines / tabs would end a line
        todo = [i for i, s in enumerate(clean) if s]
        enc = {i: len(self.tok.encode(clean[i])) for i in todo}
        self.stats.truncated += [i for i in todo if enc[i] > self.max_source]
        # longest first: similar lengths share a batch, and the slowest batch comes first
        # so the progress line's ETA errs long, not short
        order = sorted(todo, key=lambda i: -enc[i])
        if isinstance(progress, Progress):
            bar = progress
        else:
            bar = Progress(len(order), "translate", "sentences") if progress else None
        hyps, seconds, n_tokens = decode_batches(
            self.model, self.tok, [clean[i] for i in order], batch_size=batch_size,
            max_new_tokens=gen.max_new_tokens, max_source=self.max_source, mode=gen.mode,
            num_beams=gen.num_beams, progress=bar, temperature=gen.temperature,
            top_k=gen.top_k, top_p=gen.top_p, seed=gen.seed,
            length_penalty=gen.length_penalty)
        if bar is not None and not isinstance(progress, Progress):
            bar.done()
        out = [""] * len(sentences)
        for i, h in zip(order, hyps):
            out[i] = h
        self.stats.sentences += len(order)
        self.stats.seconds += seconds
        self.stats.generated_tokens += n_tokens
        return out

    def interactive(self, gen: GenerationConfig | None = None, read=input, write=print,
                    prompt: str = "en> "):
        """A prompt loop: one English line in, its Chinese out; an empty line, `quit`, EOF
        or Ctrl-C ends it."""
        while True:
            try:
                line = read(prompt)
            except (EOFError, KeyboardInterrupt):
                write("")
                return
            if line.strip() in ("", "quit", "exit", ":q"):
                return
            write(self.translate([line], gen, batch_size=1)[0])


def read_sentences(args: list[str], input_path: str | None, stdin=None) -> list[str]:
    """Sentences from positional arguments, else translate.input FILE ('-' is stdin), else stdin;
    one sentence a line (a trailing newline adds no empty sentence)."""
    if args and input_path:
        raise ValueError("give sentences as arguments or --translate.input FILE, not both")
    if args:
        return list(args)
    if input_path and input_path != "-":
        if not os.path.isfile(input_path):
            raise ValueError(f"translate.input {input_path}: no such file")
        with open(input_path, encoding="utf-8") as f:
            return f.read().splitlines()
    stdin = stdin or sys.stdin
    if stdin.isatty() and not input_path:
        raise ValueError("no English given: pass sentences as arguments, --translate.input FILE, "
                         "pipe them on stdin, or use --interactive")
    return stdin.read().splitlines()


def run(checkpoint: str, sentences: list[str] | None = None, input_path: str | None = None,
        interactive: bool = False, gen: GenerationConfig | None = None,
        batch_size: int = 32, tsv: bool = False, tokenizer: str | None = None,
        device: str | None = None, threads: int = 0, out=None, err=None) -> TranslateStats:
    """runners/translate.py: the Chinese on `out` (one line per input line, or
    english<TAB>chinese with tsv), what was loaded and how fast on `err`."""
    out = out or sys.stdout
    err = err or sys.stderr
    if threads:
        torch.set_num_threads(threads)
    todo = None if interactive else read_sentences(sentences or [], input_path)
    if interactive and (sentences or input_path):
        raise ValueError("--interactive reads its sentences from the prompt: drop the "
                         "arguments / --translate.input")
    tr = Translator.load(checkpoint, tokenizer, device)
    n = tr.model.num_params()
    print(f"loaded {tr.source}: {n:,} parameters, {tr.model.config.num_layers} layers, "
          f"on {next(tr.model.parameters()).device}", file=err, flush=True)
    if interactive:
        tr.interactive(gen, write=lambda s: print(s, file=out, flush=True))
        return tr.stats
    hyps = tr.translate(todo, gen, batch_size, progress=len(todo) > batch_size)
    for en, zh in zip(todo, hyps):
        print(f"{en}\t{zh}" if tsv else zh, file=out)
    out.flush()
    st = tr.stats
    if st.truncated:
        print(f"note: {len(st.truncated)} sentence(s) longer than {tr.max_source} tokens "
              f"were cut to their first {tr.max_source} (line {st.truncated[0] + 1}"
              + (", ..." if len(st.truncated) > 1 else "") + ")", file=err)
    print(f"translated {st.sentences} sentence(s) in {st.seconds:.2f} s "
          f"({st.tokens_per_s:,.0f} generated tokens/s, {gen.mode if gen else 'greedy'})",
          file=err)
    return st


@dataclass
class TranslateConfig:
    checkpoint: str = ""           # native checkpoint or run directory, or a ChatGLM-format
    #                                directory (required)
    # English sentences: the command line's bare words, commas kept (as an option the
    # list is comma-separated); none: input, else stdin
    sentences: list[str] = field(default_factory=list)
    input: str = ""                # file of English sentences, one a line ("-": stdin)
    tokenizer: str = ""            # tokenizer.model ("": the one inside the checkpoint)
    mode: str = "greedy"           # decoding: greedy | beam | sample
    num_beams: int = 4             # beams of mode beam
    length_penalty: float = 1.0    # beam score = log p / length ** this (mode beam)
    temperature: float = 1.0       # divide the logits by this before sampling (mode sample)
    top_k: int = 0                 # sample among the k most likely tokens only (0: all)
    top_p: float = 1.0             # sample from the smallest set holding this much probability
    seed: int | None = None        # sampling seed (null: a different draw every run)
    max_new_tokens: int = 64       # most tokens generated per sentence
    micro_batch_size: int = 32     # sentences decoded together
    device: str = ""               # cpu | cuda ("": cuda when present)
    threads: int = 0               # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("translate.checkpoint is required")
        if self.micro_batch_size <= 0:
            raise ValueError(f"translate.micro_batch_size={self.micro_batch_size} must be "
                             "positive")
        if self.threads < 0:
            raise ValueError(f"translate.threads={self.threads} must be >= 0")
        self.generation()          # a bad decoding setting fails before the model loads

    def generation(self) -> GenerationConfig:
        # floats: `--translate.top_p 1` arrives as the integer 1
        return GenerationConfig(self.mode, self.max_new_tokens, float(self.temperature),
                                self.top_k, float(self.top_p), self.num_beams,
                                float(self.length_penalty), self.seed)


def _command():
    from engine.config_cli import Alias, command
    old = {"--checkpoint": "checkpoint", "--input": "input", "--tokenizer": "tokenizer",
           "--mode": "mode", "--num-beams": "num_beams",
           "--length-penalty": "length_penalty", "--temperature": "temperature",
           "--top-k": "top_k", "--top-p": "top_p", "--seed": "seed",
           "--max-new-tokens": "max_new_tokens", "--batch-size": "micro_batch_size",
           "--device": "device", "--threads": "threads"}
    doc = (__doc__.split("\n\n")[0] + "\n\n" + _USAGE)
    return command(doc, {"translate": TranslateConfig},
                   flags={"--interactive": "prompt for one sentence at a time (an empty "
                                           "line or Ctrl-D ends)",
                          "--tsv": "print english<TAB>chinese instead of the Chinese alone"},
                   aliases={k: Alias(f"translate.{v}") for k, v in old.items()},
                   positional="translate.sentences")


_USAGE = """\
    python runners/translate.py --translate.checkpoint runs/demo/translate "File not found"
    python runners/translate.py --translate.checkpoint CKPT --translate.input en.txt > zh.txt
    echo "Permission denied" | python runners/translate.py --translate.checkpoint CKPT \\
        --translate.mode beam
    python runners/translate.py --translate.checkpoint CKPT --translate.mode sample \\
        --translate.top_p 0.9 --translate.temperature 0.7
    python runners/translate.py --translate.checkpoint CKPT --interactive

The checkpoint is a native one (a run directory works: its newest save is used) or a
ChatGLM2/3-format directory (config.json + safetensors + tokenizer.model). Decoding runs
in batches on the KV cache; the Chinese goes to stdout, load and speed notes to stderr."""


def _run_config(config, interactive: bool = False, tsv: bool = False):
    tc = config.translate
    return run(tc.checkpoint, tc.sentences, tc.input or None, interactive, tc.generation(),
               tc.micro_batch_size, tsv, tc.tokenizer or None, tc.device or None, tc.threads)


COMMAND = _command()


def main(argv=None):
    """runners/translate.py."""
    COMMAND.main(_run_config, argv)
