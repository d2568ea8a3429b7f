"""The package's layers (docs/architecture.md): a module imports only from its own layer or the layers below it."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlhf_fast"

# Lowest first. A top-level name (module or subpackage of rlhf_fast) -> its layer.
LAYERS = [
    {"_version", "_validation", "_C"},  # no rlhf_fast imports at all
    {"reference"},  # pure PyTorch: the CPU path and the test oracle
    {"_dispatch", "kernels"},  # backend choice and the Triton kernels
    {"ops", "batching"},  # the public functional ops and the rollout batcher
    {"modeling", "packed_attention"},  # model-level helpers built on the ops
    {"rollout", "rewards"},  # rollout engines and reward functions
    {"trainers"},
    {"demo", "bench", "cli", "__init__", "__main__"},  # applications
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def _top_level(path: pathlib.Path) -> str:
    part = path.relative_to(PACKAGE).parts[0]
    return part.removesuffix(".py")


def _imported_top_levels(path: pathlib.Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level rlhf_fast name) for every import of the package in ``path``, lazy ones included."""
    package_parts = list(path.relative_to(PACKAGE).parts[:-1])  # what "from ." means in this file
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rlhf_fast" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "rlhf_fast":
                    continue
                target = parts[1:]
            else:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            if target:
                found.append((node.lineno, target[0]))
            else:  # "from . import x" at the package root: each name is a top-level module
                found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts[:1])


def test_every_module_has_a_layer():
    unknown = sorted({_top_level(p) for p in _modules()} - LAYER_OF.keys())
    assert not unknown, f"add these to LAYERS (and to docs/architecture.md): {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = LAYER_OF[_top_level(path)]
    upward = [f"line {line}: imports rlhf_fast.{name} (layer {LAYER_OF.get(name)})"
              for line, name in _imported_top_levels(path) if LAYER_OF.get(name, -1) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}) imports upward: {upward}"


def test_the_check_catches_an_upward_import():
    path = PACKAGE / "reference" / "losses.py"
    source = path.read_text() + "\n\ndef late():\n    from ..trainers import PPOTrainer\n"
    assert "trainers" in {name for _, name in _imported_top_levels(path, source)}
