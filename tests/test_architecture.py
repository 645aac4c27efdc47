"""The layers import one way, front to back: every import in the source, at the top of a module or inside a
function, is checked against the layer map below. An edge against it fails with the file and line."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# package -> source folder, as pyproject.toml maps them
FOLDERS = {
    "mgc.core": ROOT / "mgc" / "core",
    "mgc.grammar": ROOT / "grammar",
    "mgc.stdlib": ROOT / "stdlib",
    "mgc.compiler": ROOT / "compiler",
    "mgc.runtime": ROOT / "runtime",
    "mgc": ROOT / "mgc",
}

# layer -> the layers it may import. core is the bottom (the error type, the checkpoint format); stdlib is a
# leaf both the compiler and the runtime use; mgc (the public API and CLI) sits on top of everything.
MAY_IMPORT = {
    "mgc.core": {"mgc.core"},
    "mgc.stdlib": {"mgc.core", "mgc.stdlib"},
    "mgc.grammar": {"mgc.core", "mgc.grammar"},
    "mgc.compiler": {"mgc.core", "mgc.stdlib", "mgc.grammar", "mgc.compiler"},
    "mgc.runtime": {"mgc.core", "mgc.stdlib", "mgc.grammar", "mgc.compiler", "mgc.runtime"},
    "mgc": set(FOLDERS),
}


def layer_of(module: str) -> str:
    for layer in sorted(FOLDERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} is in no layer")


def modules() -> list[tuple[str, Path]]:
    out = []
    for package, folder in FOLDERS.items():
        for file in sorted(folder.rglob("*.py")):
            rel = file.relative_to(folder).with_suffix("").parts
            if package == "mgc" and rel[0] == "core":
                continue  # its own layer
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out.append((".".join((package, *parts)), file))
    return out


def imports(module: str, file: Path) -> list[tuple[str, int]]:
    """(imported mgc module, line) for every import statement in the file, however deeply nested."""
    is_package = file.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from mgc import fisher` imports the module mgc.fisher
            found += [(f"{target}.{a.name}" if target == "mgc" else target, node.lineno) for a in node.names]
    return [(name, line) for name, line in found if name == "mgc" or name.startswith("mgc.")]


def test_every_module_is_in_a_layer():
    assert len(modules()) > 40
    for module, _ in modules():
        assert layer_of(module) in MAY_IMPORT


def test_imports_go_one_way():
    against = []
    for module, file in modules():
        layer = layer_of(module)
        for target, line in imports(module, file):
            if layer_of(target) not in MAY_IMPORT[layer]:
                against.append(f"{file.relative_to(ROOT)}:{line}: {layer} imports {target}")
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_the_checker_sees_an_edge_against_the_order(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mgc.runtime.execute import execute\n    from ..compiler import ir\n")
    found = imports("mgc.stdlib.bad", bad)
    assert ("mgc.runtime.execute", 2) in found and ("mgc.compiler", 3) in found
    assert {layer_of(t) for t, _ in found} - MAY_IMPORT["mgc.stdlib"] == {"mgc.runtime", "mgc.compiler"}
