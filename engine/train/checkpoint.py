"""Checkpoint directories, layout-free and written atomically.

    <dir>/meta.json                 config, step, data position, RNG, tokenizer sha256,
                                    layout, and the sha256 of every file below
    <dir>/model/*.safetensors       full tensor names (as in a single-process GLM),
                                    one file per writer (e.g. per pipeline stage)
    <dir>/optim/*.safetensors       optimizer state, per parameter name
                                    ("exp_avg/<name>", "exp_avg_sq/<name>", ...)
    <dir>/tokenizer.model           (runs) the tokenizer, hashed like every other file

Any reader finds a tensor by name in whichever file holds it, so a checkpoint written by
one layout loads into any other. Writing goes to a sibling temp directory that is renamed
into place only when complete: an interrupted save never damages an existing checkpoint.
meta.json carries the sha256 of its own canonical content ("meta_sha256"), so an edited
step or config is refused like a corrupted tensor file. Training runs keep several
step-numbered checkpoints per out_dir (engine/train/run_dir.py).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.train import faults
from engine.train.file_mode import respect_umask

FORMAT_VERSION = 2      # 2: meta.json carries meta_sha256
TOKENIZER_FILE = "tokenizer.model"


class CheckpointError(ValueError):
    pass


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                         for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict):
    import numpy as np

    def decode(s):
        return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's canonical content without the digest itself."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fsync_dir(path: str):
    """Make a rename inside `path` durable (a power cut must not undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_free_space(path: str, need: int, what: str):
    """Refuse a save the disk cannot hold before writing a byte of it."""
    free = shutil.disk_usage(path).free
    if free < need:
        raise CheckpointError(f"not enough free space for {what} in {path}: it needs "
                              f"{need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free")


def temp_dir_for(path: str) -> str:
    path = os.path.abspath(path)
    return f"{path}.tmp"


def make_temp_dir(tmp: str) -> str:
    """An empty temp dir (a stale one of an interrupted save is partial: removed)."""
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, "model"))
    os.makedirs(os.path.join(tmp, "optim"))
    faults.point("save:begin")
    return tmp


def begin_save(path: str) -> str:
    """Create an empty temp dir next to `path` (one writer, before a barrier)."""
    _restore_old(os.path.abspath(path))
    return make_temp_dir(temp_dir_for(path))


def write_tensors(tmp: str, relpath: str, tensors: dict[str, torch.Tensor]):
    """Each writer (rank) saves its own files into the temp dir."""
    if not tensors:
        return
    dest = os.path.join(tmp, relpath)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, dest)
    with open(dest, "rb") as f:
        os.fsync(f.fileno())
    faults.point("save:tensors")


def seal(tmp: str, meta: dict, extra_files: dict[str, str] | None = None) -> dict:
    """Copy the extra files (name in the checkpoint -> source path) into the temp dir,
    hash every file, write meta.json last (with its own digest). A tokenizer.model that
    is not the one meta's tokenizer_sha256 names is refused."""
    for rel, src in (extra_files or {}).items():
        dest = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(src, dest)
    files = {}
    for root, _, names in os.walk(tmp):
        for name in sorted(names):
            full = os.path.join(root, name)
            respect_umask(full)   # safetensors.save_file creates its files 0600
            files[os.path.relpath(full, tmp)] = sha256_file(full)
    want = meta.get("tokenizer_sha256")
    if TOKENIZER_FILE in files and want and files[TOKENIZER_FILE] != want:
        src = (extra_files or {}).get(TOKENIZER_FILE, TOKENIZER_FILE)
        raise CheckpointError(f"{src} (sha256 {files[TOKENIZER_FILE][:12]}) is not the "
                              f"tokenizer this run trained with (sha256 {want[:12]}); was it "
                              "replaced during the run?")
    meta = {**meta, "format_version": FORMAT_VERSION, "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta["meta_sha256"] = meta_digest(meta)
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    faults.point("save:sealed")
    return meta


def _restore_old(path: str):
    """A crash between finish_save's two renames leaves `path`.old as the only complete
    copy: put it back before anything could delete it."""
    old = f"{path}.old"
    if os.path.isdir(old) and not os.path.exists(path):
        os.rename(old, path)


def finish_save(path: str, meta: dict, extra_files: dict[str, str] | None = None):
    """Hash every file, write meta.json last, then swap the temp dir into place."""
    path = os.path.abspath(path)
    tmp = temp_dir_for(path)
    seal(tmp, meta, extra_files)
    _restore_old(path)
    old = f"{path}.old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.rename(path, old)
    faults.point("save:swapping")
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))
    if os.path.exists(old):
        shutil.rmtree(old)


def save_checkpoint(path: str, model_tensors: dict, optim_tensors: dict, meta: dict,
                    model_file: str = "model/model.safetensors",
                    optim_file: str = "optim/rank0.safetensors",
                    extra_files: dict[str, str] | None = None):
    """Single-writer convenience: everything from one process. A failed save removes
    its partial files and leaves an existing checkpoint at `path` as it was."""
    tmp = begin_save(path)
    try:
        write_tensors(tmp, model_file, model_tensors)
        write_tensors(tmp, optim_file, optim_tensors)
        finish_save(path, meta, extra_files)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _looks_like_chatglm(path: str) -> bool:
    names = os.listdir(path)
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


class Checkpoint:
    """A validated checkpoint directory: meta.json parsed, every file present with the
    recorded sha256. Tensors are read lazily by name from whichever file holds them."""

    def __init__(self, path: str, verify: bool = True):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            hint = (f" ({path}.old holds the previous one: a save was interrupted)"
                    if os.path.isdir(f"{path}.old") else "")
            raise CheckpointError(f"checkpoint {path} does not exist{hint}")
        if not os.path.isfile(meta_path):
            if _looks_like_chatglm(path):   # a downloaded model, not a broken save
                raise CheckpointError(
                    f"{path} is a ChatGLM-format directory (config.json + safetensors, no "
                    f"meta.json): import it once with `python runners/convert_checkpoint.py "
                    f"--convert.direction from_chatglm --convert.checkpoint {path} "
                    f"--convert.out_dir OUT` and pass OUT")
            raise CheckpointError(f"checkpoint {path} has no meta.json (incomplete save?)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint {meta_path} is corrupt: {e}") from None
        if not isinstance(self.meta, dict):
            raise CheckpointError(f"checkpoint {meta_path} is corrupt: not a JSON object")
        for key in ("format_version", "files", "step"):
            if key not in self.meta:
                raise CheckpointError(f"checkpoint {meta_path} lacks {key!r}")
        if not isinstance(self.meta["format_version"], int):
            raise CheckpointError(f"checkpoint {meta_path}: format_version "
                                  f"{self.meta['format_version']!r} is not a number")
        if self.meta["format_version"] >= 2 and (
                self.meta.get("meta_sha256") != meta_digest(self.meta)):
            raise CheckpointError(f"checkpoint {meta_path} was edited or is corrupt (its "
                                  "meta_sha256 does not match its content)")
        if not isinstance(self.meta["step"], int) or self.meta["step"] < 0:
            raise CheckpointError(f"checkpoint {meta_path}: step {self.meta['step']!r} is not "
                                  "a step number")
        for rel, digest in self.meta["files"].items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"checkpoint file {full} is missing")
            if verify and sha256_file(full) != digest:
                raise CheckpointError(f"checkpoint file {full} is corrupt or truncated "
                                      "(sha256 mismatch)")
        want = self.meta.get("tokenizer_sha256")
        have = self.meta["files"].get(TOKENIZER_FILE)
        if want and have and want != have:
            raise CheckpointError(f"checkpoint {path}: its {TOKENIZER_FILE} (sha256 "
                                  f"{have[:12]}) is not the tokenizer it was trained with "
                                  f"({want[:12]})")
        self._index: dict[str, dict[str, str]] = {}  # "model" | "optim" -> name -> file

    def _files(self, kind: str) -> list[str]:
        return sorted(r for r in self.meta["files"] if r.startswith(kind + "/"))

    def _build_index(self, kind: str):
        if kind in self._index:
            return self._index[kind]
        from safetensors import safe_open
        index = {}
        for rel in self._files(kind):
            try:
                with safe_open(os.path.join(self.path, rel), "pt") as f:
                    for name in f.keys():
                        index[name] = rel
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"checkpoint file {rel} is unreadable: {e}") from None
        self._index[kind] = index
        return index

    def names(self, kind: str = "model") -> list[str]:
        return sorted(self._build_index(kind))

    def load(self, kind: str = "model", names=None) -> dict[str, torch.Tensor]:
        """Tensors by name; `names` limits which (a pipeline stage loads its own)."""
        index = self._build_index(kind)
        wanted = list(index) if names is None else list(names)
        missing = [n for n in wanted if n not in index]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} has no {kind} tensor "
                                  f"{missing[0]!r}" + (f" (+{len(missing) - 1} more)"
                                                       if len(missing) > 1 else ""))
        by_file: dict[str, list[str]] = {}
        for n in wanted:
            by_file.setdefault(index[n], []).append(n)
        out = {}
        for rel, ns in by_file.items():
            tensors = load_file(os.path.join(self.path, rel))
            out.update({n: tensors[n] for n in ns})
        return out

    def check_tokenizer(self, sha256: str | None, tokenizer_path: str = "the tokenizer"):
        want = self.meta.get("tokenizer_sha256")
        if want and sha256 and want != sha256:
            raise CheckpointError(f"{tokenizer_path} (sha256 {sha256[:12]}) does not match "
                                  f"checkpoint {self.path} (tokenizer sha256 {want[:12]})")


def load_model_weights(model: torch.nn.Module, ckpt: Checkpoint, strict: bool = True):
    """Copy every parameter this (possibly partial) model holds from the checkpoint."""
    names = [n for n, _ in model.named_parameters()]
    tensors = ckpt.load("model", names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = tensors[name]
            if t.shape != p.shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, "
                                      f"model expects {tuple(p.shape)}")
            p.copy_(t)
