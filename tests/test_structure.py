"""The package's import graph has no cycles, and every module imports on its own.

A cycle between two modules works or breaks depending on which is imported first; the static
check below finds every cycle among module-level imports, whatever the order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ernie45

PACKAGE_DIR = Path(ernie45.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports at module level (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import x` names a module
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    # NOTE: a module's parent packages are imported before it anyway, so an edge to one is no cycle.
    return {m for m in found if m in known and m != name and m not in ancestors}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_package_modules():
    modules = all_modules()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    assert len(graph) > 40 and graph["ernie45.models.causal_lm"]  # the parse found the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Import each module as the first one of the package, in reverse order, in one fresh process
    per module group; a cycle or a missing import fails here whatever the test order."""
    names = sorted(all_modules(), reverse=True)
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    models_first = [n for n in names if n.startswith("ernie45.models.")]
    for order in (names, models_first):
        done = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


def test_model_code_never_imports_the_distributed_package():
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith(("ernie45.models", "ernie45.moe")):
            imports = imported_modules(name, path, set(modules))
            assert not any(m.startswith("ernie45.distributed") for m in imports), (name, imports)


def test_import_stays_light():
    """``import ernie45`` (every CLI command, every inference script) leaves out what only some calls
    need: DTensor (which pulls in sympy) and transformers' generation utilities (measured together:
    386 -> 303 MiB of RSS, 2.5 -> 0.8 s of imports after torch); they are imported where a call needs them."""
    assert_import_leaves_out("ernie45", ("torch.distributed.tensor", "transformers.generation.utils", "sympy"))


def test_command_line_starts_without_the_training_stack():
    """``ernie45 --help`` (and every command's start) builds ``finetune``'s long help, which reads the
    recipe schema, only when it is shown: that import chain (training config, parallel stack, DTensor)
    took 5.4 -> 2.9 s of ``ernie45 --help``."""
    assert_import_leaves_out("ernie45.cli", ("ernie45.training.config", "ernie45.distributed", "torch.distributed.tensor"))


def assert_import_leaves_out(module: str, heavy: tuple[str, ...]) -> None:
    script = f"import sys, {module}\nprint([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_dtensor_check_needs_no_import():
    """``is_dtensor`` is False for plain tensors without importing DTensor, True for a DTensor."""
    script = (
        "import sys, torch\nfrom ernie45.sharding import is_dtensor, local_index\n"
        "assert not is_dtensor(torch.ones(2)) and local_index(torch.ones(2)) is None\n"
        "assert 'torch.distributed.tensor' not in sys.modules\n"
        "import torch.distributed as dist\n"
        "from torch.distributed.tensor import DTensor, Replicate, init_device_mesh\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "d = DTensor.from_local(torch.ones(2), init_device_mesh('cpu', (1,)), [Replicate()])\n"
        "assert is_dtensor(d) and not is_dtensor(d.to_local()) and local_index(d) == (slice(0, 2),)\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
