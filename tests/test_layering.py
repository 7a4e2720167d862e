"""The import rules of docs/architecture.md, checked on every import of every library file
(module level and inside functions): a new import that crosses a layer fails here."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_PACKAGES = ("parallel", "tensor_parallel", "pipeline", "optim", "train", "planner",
                   "recipe", "gpu_check")
CORE = ("engine.tensor_parallel", "engine.pipeline", "engine.optim")
# part -> the parts it must never import
NEVER = {
    "kernels": ("model", "engine", "runners"),
    "model": ("engine", "runners"),
    "engine.parallel": tuple(f"engine.{p}" for p in ENGINE_PACKAGES if p != "parallel"),
    **{c: ("engine.train", "engine.planner", "engine.recipe", "engine.gpu_check")
       for c in CORE},
    "engine.train": ("engine.recipe", "engine.gpu_check"),
    "engine.planner": ("engine.recipe", "engine.gpu_check"),
    "engine": ("engine.recipe", "engine.gpu_check"),   # the top-level shared modules
}


def _part(path: str) -> str:
    parts = path[:-3].split("/")
    if parts[0] == "engine" and len(parts) > 2:
        return f"engine.{parts[1]}"
    return parts[0]


def _imports(path: str):
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if f.split("/")[0] in ("kernels", "model", "engine", "runners",
                                                  "tests")]


def _hits(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_import_respects_the_layers():
    bad = []
    for path in _files():
        rules = NEVER.get(_part(path), ())
        for line, module in _imports(path):
            if _hits(module, rules):
                bad.append(f"{path}:{line} imports {module}")
    assert not bad, "layer violations (docs/architecture.md):\n" + "\n".join(bad)


def test_nothing_imports_a_runner():
    bad = [f"{path}:{line} imports {module}" for path in _files()
           if not path.startswith("runners/")
           for line, module in _imports(path) if _hits(module, ("runners",))]
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_violation():
    # the checker itself: an engine.parallel module importing the pipeline is caught
    assert _hits("engine.pipeline.p2p", NEVER["engine.parallel"])
    assert not _hits("engine.parallel.state", NEVER["engine.pipeline"])
    assert _part("engine/parallel/state.py") == "engine.parallel"
    assert _part("engine/config.py") == "engine"
