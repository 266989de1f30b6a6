"""The rules of docs/architecture.md, each checked on the source (static imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anomalyvae"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (type-only imports are not run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Module -> [(imported anomalyvae module, names imported from it)], lazy ones too."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        found = []
        for node in ast.walk(tree):
            if getattr(node, "lineno", 0) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anomalyvae"):
                target = node.module
                names = [a.name for a in node.names]
                # `from anomalyvae import calibration` imports a module, not the package
                submodules = [n for n in names if f"{target}.{n}" in modules]
                found += [(f"{target}.{n}", []) for n in submodules]
                if len(submodules) < len(names):
                    found.append((target, [n for n in names if n not in submodules]))
            elif isinstance(node, ast.Import):
                found += [(a.name, []) for a in node.names if a.name.startswith("anomalyvae")]
        out[name] = found
    return out


IMPORTS = _imports()


def _targets(module: str) -> set[str]:
    return {target for target, _ in IMPORTS[module] if target in IMPORTS}


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(_targets(module)):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(IMPORTS):
        if module not in state:
            visit(module, [module])


#: Leaves every layer may import: the version, the error base classes, the command clock,
#: the progress bar.
LEAVES = ("anomalyvae.version", "anomalyvae.errors", "anomalyvae.clock", "anomalyvae.progress")
#: What each layer may import from the package (besides itself and the leaves).
ALLOWED = {
    "anomalyvae.imaging": ("anomalyvae.imaging",),
    "anomalyvae.inference": ("anomalyvae.imaging", "anomalyvae.inference"),
    "anomalyvae.models": ("anomalyvae.imaging", "anomalyvae.models"),
    "anomalyvae.calibration": (),
    "anomalyvae.metrics": (),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_flow_one_way(layer):
    allowed = (*ALLOWED[layer], *LEAVES)
    for module in IMPORTS:
        if module != layer and not module.startswith(layer + "."):
            continue
        for target in _targets(module):
            assert target.startswith(allowed) or target == layer, f"{module} imports {target}"


def test_nothing_imports_the_cli_and_scan_does_not_import_ray():
    for module in IMPORTS:
        if module in ("anomalyvae.cli", "anomalyvae.__main__"):
            continue
        assert "anomalyvae.cli" not in _targets(module), module
    assert "anomalyvae.inference.ray_engine" not in _targets("anomalyvae.inference.scan")


def test_leaves_import_nothing_of_the_package():
    for leaf in LEAVES:
        assert not _targets(leaf), leaf


def test_no_module_imports_another_modules_private_names():
    for module, imports in IMPORTS.items():
        for target, names in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module} imports {private} from {target}"


def test_nothing_outside_models_branches_on_the_family_name():
    """Outside models/, code asks the family object what it can do; it never compares
    the family's name (``family_ == "feature"``)."""
    import re

    pattern = re.compile(r"family_?\s*[!=]=|[!=]=\s*(detector\.)?family_?\b")
    roots = [PACKAGE, PACKAGE.parent / "pipelines"]
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        if PACKAGE / "models" in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"


def test_shared_model_code_never_dispatches_on_the_family():
    """Inside models/, only the families know which family a model is: the shared code
    (maps, scoring, batches, checkpoints) asks the model's family object, it never tests
    a model's class or compares a family's name."""
    import re

    pattern = re.compile(
        r"isinstance\([^)]*\b(ConvVAE|FeatureVAE)\b|[!=]=\s*\"(pixel|feature)\"|"
        r"\"(pixel|feature)\"\s*[!=]="
    )
    families = PACKAGE / "models" / "families"
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        if families in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"
