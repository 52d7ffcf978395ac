"""The package layering: every import of ours points down a layer, and no import cycle exists.

The layers, bottom to top, are written down once, in `LAYERS`: a module may import from its own subpackage and
from any lower layer, never from its own layer's other packages or from above. Imports inside functions count
like any other; the few that stay inside a function only to save start-up time are listed in `LAZY`, each with
its reason, and every other function-level import of ours fails the test (hoist it to the top of the module).
The two speech families never import each other (shared layers live in `qwen_omni.speech`).

The walk reads the source (ast), so it sees imports that a run would only reach on some code path.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Dotted prefix -> layer. The longest matching prefix decides; a module's own package is its prefix's entry.
LAYERS = {
    "qwen_omni.errors": 0,
    "encoders": 0,
    "qwen_omni.synthetic": 0,
    "qwen_omni.models": 1,
    "qwen_omni.engine": 2,
    "qwen_omni.speech": 3,
    "qwen_omni.assistant": 4,
    "qwen_omni": 5,  # the package's __init__ alone: it re-exports load, Assistant and the errors
    "qwen_omni.serving": 6,
    "qwen_omni.webapp": 7,
    "qwen_omni.train": 7,
    "qwen_omni.cli": 8,
    "qwen_omni.eval": 8,
    "qwen_omni.__main__": 9,
    "app": 10,
}

# Function-level imports of ours that are kept there to save start-up time (importer, imported): reason.
LAZY = {
    ("qwen_omni.cli", "qwen_omni.assistant"): "`--help` and argument errors answer without importing torch",
    ("qwen_omni.cli", "qwen_omni.serving.server"): "FastAPI is imported only for `serve`",
    ("qwen_omni.cli", "qwen_omni.webapp.space"): "the Space builder is imported only for `space`",
    ("qwen_omni.webapp.settings", "qwen_omni.assistant"): "app.py's `--help` answers without importing torch",
    ("qwen_omni.webapp.settings", "qwen_omni.serving.remote"): "httpx is imported only for the remote backend",
    ("qwen_omni.serving.server", "qwen_omni.assistant"): "with --backend openai or --engine-process this "
                                                         "process never loads a model",
    ("qwen_omni.serving.process_backend", "qwen_omni.assistant"): "only the spawned model process loads one",
}

FAMILIES = ("qwen_omni.speech.qwen25", "qwen_omni.speech.qwen3")


def module_files() -> dict[str, Path]:
    files = {"app": ROOT / "app.py"}
    for top in ("qwen_omni", "encoders"):
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def layer(module: str) -> tuple[str, int]:
    """(the LAYERS prefix owning `module`, its layer); ("", -1) for a module in no layer."""
    owners = [p for p in LAYERS if module == p or (p != "qwen_omni" and module.startswith(p + "."))]
    best = max(owners, key=len, default="")
    return best, LAYERS.get(best, -1)


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function?) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                targets = {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in child.names}
                out.extend((t, child.lineno, in_function) for t in sorted(targets))  # `from pkg import module`
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return [(m, line, lazy) for m, line, lazy in out if m in known or m.split(".")[0] in ("qwen_omni", "encoders")]


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = module_files()
    return {m: imports(m, f, known) for m, f in known.items()}


def test_imports_point_down():
    bad = []
    for module, edges in graph().items():
        own, rank = layer(module)
        if rank < 0:
            bad.append(f"{module} belongs to no layer: move it into the subpackage of its concern")
            continue
        for target, line, lazy in edges:
            t_own, t_rank = layer(target)
            where = f"{module}:{line} imports {target}"
            if t_own != own and t_rank >= rank:
                bad.append(f"{where}: layer {t_rank} ({t_own}) is not below layer {rank} ({own})")
            if lazy and (module, target) not in LAZY:
                bad.append(f"{where} inside a function: hoist it, or list it in LAZY with the start-up it saves")
            for fam in FAMILIES:
                if module.startswith(fam + ".") and any(target.startswith(f + ".") or target == f
                                                        for f in FAMILIES if f != fam):
                    bad.append(f"{where}: one speech family imports the other")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in e if t != m}) for m, e in graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_lazy_table_is_current():
    """Every LAZY entry is still a function-level import (a stale entry would hide nothing, but mislead)."""
    seen = {(m, t) for m, e in graph().items() for t, _, lazy in e if lazy}
    assert set(LAZY) <= seen, sorted(set(LAZY) - seen)


def test_flat_modules_are_the_public_face():
    flat = {f.name for f in (ROOT / "qwen_omni").glob("*.py")}
    assert flat <= {"__init__.py", "__main__.py", "errors.py", "assistant.py", "cli.py", "eval.py"}, sorted(flat)
