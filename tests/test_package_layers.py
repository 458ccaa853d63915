"""The package's layers (DESIGN.md §3): the API (icon_kernels/__init__.py, functional, modules,
env_report) sits on presets, which sit on distributed and helpers, which sit on backends, which
sit on the core tables and checks (families, targets, validation, reduction). A module imports
only from its own layer's subpackage or from a lower layer; every module is placed in a layer, so
a new one must be placed here before it imports anything."""
import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "icon_kernels"

CORE, BACKENDS, SIDE, PRESETS, API = range(5)
LAYER_OF_TOP_MODULE = {"targets": CORE, "families": CORE, "validation": CORE, "reduction": CORE,
                       "target_adapters": CORE,
                       "_C": BACKENDS, "_C_cuda": BACKENDS, "_triton": BACKENDS, "backends": BACKENDS,
                       "helpers": SIDE, "distributed": SIDE, "presets": PRESETS,
                       "functional": API, "modules": API, "env_report": API, "__main__": API,
                       "__init__": API}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def placement(module: str):
    """(layer, subpackage) of an icon_kernels module; KeyError for a module with no layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return API, "icon_kernels"
    top = parts[1]
    subpackage = {"_C": "backends", "_C_cuda": "backends", "_triton": "backends"}.get(top, top)   # the compiled kernels
    if len(parts) == 2 and top not in ("backends", "helpers", "distributed", "presets", "_C", "_C_cuda", "_triton"):
        subpackage = "core" if LAYER_OF_TOP_MODULE[top] == CORE else "api"
    return LAYER_OF_TOP_MODULE[top], subpackage


def package_imports(path: Path, text: str):
    """Every icon_kernels module that ``path`` (source ``text``) imports, with its line."""
    is_package = path.name == "__init__.py"
    here = module_name(path).split(".")
    package = here if is_package else here[:-1]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "icon_kernels":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "icon_kernels":
                continue
            for alias in node.names:     # `from pkg import module` imports the module
                candidate = f"{source}.{alias.name}"
                where = PACKAGE.parent / Path(*candidate.split("."))
                is_module = (where.with_suffix(".py").exists() or where.is_dir()
                             or candidate in ("icon_kernels._C", "icon_kernels._C_cuda"))   # the built extensions
                yield (candidate if is_module else source), node.lineno


def layering_violations(sources):
    """The imports that break the layering, for sources {path: text}."""
    found = []
    for path, text in sources.items():
        importer = module_name(path)
        layer, sub = placement(importer)
        for imported, line in package_imports(path, text):
            if imported == "icon_kernels" and layer != API:
                found.append(f"{path.name}:{line} imports the package root (the API layer)")
                continue
            their_layer, their_sub = placement(imported)
            if their_layer > layer or (their_layer == layer and layer in (SIDE, PRESETS, BACKENDS)
                                       and their_sub != sub):
                found.append(f"{importer}:{line} imports {imported} (layer {their_layer} > {layer} "
                             f"or a sibling subpackage)")
    return found


def package_sources():
    return {p: p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if "_triton" not in p.parts}


def test_every_module_has_a_layer():
    for path in package_sources():
        placement(module_name(path))          # KeyError names a module with no layer


def test_no_module_imports_upward_across_the_layers():
    sources = package_sources()
    assert len(sources) > 30                 # the package was found
    assert layering_violations(sources) == []


def test_the_layer_check_sees_upward_and_sideways_imports():
    # planted: a distributed module reaching up to the API (as rank_agreement once read
    # icon_kernels.functional) and up to the presets, and sideways into helpers
    planted = PACKAGE / "distributed" / "planted.py"
    text = "from .. import functional\nfrom ..presets import base\nfrom ..helpers import knn\n" \
           "from ..backends import ops\nfrom . import ring\nfrom ..validation import check_matrix\n"
    found = layering_violations({planted: text})
    assert [f.split(" imports ")[1].split(" ")[0] for f in found] == [
        "icon_kernels.functional", "icon_kernels.presets.base", "icon_kernels.helpers.knn"]
