"""The package's shape: data flows one way, the model needs no Lightning, the built-in default
stays apart, and no two modules import each other."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slit_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module -> the slit_lightning modules it imports (anywhere in the file, type-only
    imports included)."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in known and m != name and "." in m}
    return graph


def core(name: str) -> bool:
    return not name.startswith(
        ("slit_lightning.builtin", "slit_lightning.cli", "slit_lightning.bench")
    )


def test_the_core_never_imports_the_built_in_default():
    offenders = {
        f"{a} -> {b}"
        for a, targets in imports().items()
        for b in targets
        if core(a) and b.startswith("slit_lightning.builtin")
    }
    assert not offenders


def test_the_model_imports_nothing_above_it_and_no_lightning():
    above = ("stages", "training", "evaluation", "builtin", "cli", "bench", "data.datamodule")
    for path in (PACKAGE / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "lightning"], path
    offenders = {
        f"{a} -> {b}"
        for a, targets in imports().items()
        for b in targets
        if a.startswith("slit_lightning.model")
        and b.startswith(tuple(f"slit_lightning.{x}" for x in above))
    }
    assert not offenders


def test_no_import_cycles():
    graph = imports()
    packages = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    edges = {
        a: {b for b in bs if b not in packages} for a, bs in graph.items() if a not in packages
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles


def test_the_inference_api_loads_without_lightning_or_the_built_in_default():
    code = (
        "import sys; from slit_lightning import SLIT; SLIT.__name__;"
        "import slit_lightning.cli.main;"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('lightning')}),"
        " [m for m in sys.modules if m.startswith('slit_lightning.builtin')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def _modules_after(call: str) -> list[str]:
    code = (
        "import sys; from slit_lightning.cli.main import main;"
        f"main({call});"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('lightning')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_commands_that_do_not_train_never_import_lightning(tmp_path, stage_checkpoints):
    corpus = tmp_path / "corpus"
    synth = ["data", "synth", "--out", str(corpus), "--clips", "8", "--clip_seconds", "1.0"]
    assert _modules_after(repr([*synth, "--quiet"])) == "[]"
    clip = str(next((corpus / "audio").rglob("*.flac")))
    caption = ["caption", clip, "--ckpt", str(stage_checkpoints["stage2"]), "--max_new_tokens", "3"]
    assert _modules_after(repr(caption)) == "[]"
