"""Layers import downward only: every `minisrv` import, relative or absolute, top-level or inside a function, is
checked against the layer order that ARCHITECTURE.md describes. A package may import itself and lower layers,
never a sibling. minisrv/__init__.py, the public face (LLM, SamplingParams, __version__), stands outside the
order."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "minisrv"

# Lowest first. Packages in one layer may not import each other.
LAYERS = [
    {"fields"},
    {"config", "sampling_params", "structured_output"},
    {"wire", "ipc", "kernels"},
    {"layers"},
    {"models"},
    {"scheduler"},
    {"engine", "tokenizer"},
    {"server"},
    {"runtime"},
    {"llm", "chat"},
    {"cli"},
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """The package (or top-level module) a dotted `minisrv....` name belongs to; "__init__" for the root."""
    parts = module.split(".")
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "__init__"


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The dotted module an import-from names, `from .x import y` resolved against the importing file."""
    if not node.level:
        return node.module or ""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]   # a module's or __init__'s package
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        module = absolute(node, path) if isinstance(node, ast.ImportFrom) else ""
        if module.startswith("minisrv"):
            # `from minisrv import config, llm` names its modules; deeper, the package is what counts.
            names = [f"{module}.{a.name}" for a in node.names] if module == "minisrv" else [module]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("minisrv")]
    return found


def test_every_package_has_a_layer() -> None:
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert units - {"__init__"} == set(LAYER_OF), "add new packages to LAYERS (and to ARCHITECTURE.md)"


def test_imports_go_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, module in imports(path):
            there = unit_of(module)
            if "__init__" in (here, there):
                continue
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert upward == []
