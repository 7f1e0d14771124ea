"""The package's architecture, read from its imports (ast), so the layering stays true.

Layers, lowest first; a module may import its own layer and the ones below, never above:
    _C, kernels < ops < rl < config < model < rollout < rewards < train < algorithms < demo, cli, __main__
The package facade grpo_fast/__init__.py imports nothing at import time (its names resolve lazily).
Within that: the rollout engines import no algorithm and nothing of the loop, the rewards nothing of
the loop, and the algorithm files no sibling.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "grpo_fast"
KERNELS = ROOT / "kernels"

LAYERS = {"_C": 0, "kernels": 0, "ops": 1, "rl": 2, "config": 3, "model": 4, "rollout": 5, "rewards": 6,
          "train": 7, "algorithms": 8, "demo": 9, "demo_tools": 9, "cli": 9, "__main__": 9}
# third-party packages a module may import inside a function: optional extras, or the GPU-only compiler
OPTIONAL = {"peft", "tensorboard", "matplotlib", "vllm", "triton", "datasets", "trl"}


def _modules():
    """(dotted name, path) of every module of the package, kernels/ included as grpo_fast.kernels."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    for path in sorted(KERNELS.rglob("*.py")):
        rel = path.relative_to(KERNELS).with_suffix("")
        parts = ["grpo_fast", "kernels"] + [p for p in rel.parts if p != "__init__"]
        out.append((".".join(parts), path))
    return out


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> list:
    """The absolute grpo_fast modules a `from ... import ...` names."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if _is_package(path) else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("grpo_fast"):
        return [base]
    if node.module is None:  # from . import a, b: each name is a submodule (or a name of the package)
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def _imports(module: str, path: pathlib.Path):
    """(imported module, is_top_level, line) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    # imports guarded at module level (try/except ImportError, if TYPE_CHECKING) count as top level
    for n in tree.body:
        if isinstance(n, (ast.Try, ast.If)):
            top |= {id(c) for c in ast.walk(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(module, path, node)
        else:
            continue
        for name in names:
            yield name, id(node) in top, node.lineno


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "grpo_fast":
        return None
    if len(parts) == 1:
        return None  # the facade
    return LAYERS.get(parts[1])


MODULES = _modules()
NAMES = {m for m, _ in MODULES}


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_run_down(module, path):
    if module == "grpo_fast":
        for name, _, line in _imports(module, path):
            assert not name.startswith("grpo_fast"), f"the facade imports {name} at line {line}"
        return
    mine = _layer(module)
    assert mine is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    for name, _, line in _imports(module, path):
        theirs = _layer(name)
        if theirs is None:
            continue
        assert theirs <= mine, f"{path.relative_to(ROOT)}:{line} imports {name} (layer {theirs}) from layer {mine}"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_at_module_top(module, path):
    """Inside functions only optional dependencies (and the Triton kernels, which need triton)."""
    for name, top, line in _imports(module, path):
        if top:
            continue
        root = name.split(".")[0]
        ok = root in OPTIONAL or name.startswith("grpo_fast.kernels") or name.startswith("torch.utils.tensorboard")
        assert ok, f"{path.relative_to(ROOT)}:{line} imports {name} inside a function: move it to the top"


def _imports_of(package: str):
    """(module, path, imported name, line) of every grpo_fast import made by modules of `package`."""
    for module, path in MODULES:
        if module == f"grpo_fast.{package}" or module.startswith(f"grpo_fast.{package}."):
            for name, _, line in _imports(module, path):
                if name.startswith("grpo_fast"):
                    yield module, path, name, line


def _is_in(name: str, *packages: str) -> bool:
    return any(name == f"grpo_fast.{p}" or name.startswith(f"grpo_fast.{p}.") for p in packages)


def test_rollout_engines_import_no_algorithm_and_nothing_of_the_loop():
    for module, path, name, line in _imports_of("rollout"):
        assert not _is_in(name, "algorithms", "train", "rewards"), \
            f"{path.relative_to(ROOT)}:{line} imports {name}: rollout engines know no algorithm, loop or reward"


def test_rewards_import_nothing_of_the_loop():
    for module, path, name, line in _imports_of("rewards"):
        assert not _is_in(name, "train", "algorithms"), f"{path.relative_to(ROOT)}:{line} imports {name}"


def test_algorithm_files_do_not_import_each_other():
    for module, path, name, line in _imports_of("algorithms"):
        own = module.split(".")[2] if len(module.split(".")) > 2 else None
        other = name.split(".")[2] if len(name.split(".")) > 2 and _is_in(name, "algorithms") else None
        if own is not None and other is not None and other != own:
            pytest.fail(f"{path.relative_to(ROOT)}:{line} imports the sibling algorithm {name}")


def test_the_loop_imports_no_algorithm():
    for module, path, name, line in _imports_of("train"):
        assert not _is_in(name, "algorithms"), f"{path.relative_to(ROOT)}:{line} imports {name}: the loop composes " \
                                               "an algorithm it is given"


def test_no_import_cycles():
    graph = {m: set() for m in NAMES}
    for module, path in MODULES:
        for name, top, _ in _imports(module, path):
            if not top:
                continue
            # `from pkg import name` may name a submodule or an attribute: keep the longest known module
            while name and name not in NAMES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    state = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n] if n in stack else [m, n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_rules_can_fail(tmp_path):
    """The checker itself: an upward import, a lazy internal import and a sibling import are caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from grpo_fast.train import trainer\n\ndef f():\n    import json\n")
    found = list(_imports("grpo_fast.ops.bad", bad))
    assert ("grpo_fast.train", True, 1) in found
    assert _layer("grpo_fast.train") > _layer("grpo_fast.ops.bad")
    assert _is_in("grpo_fast.algorithms.ppo", "algorithms") and not _is_in("grpo_fast.trainx", "train")
    assert ("json", False, 4) in found and "json" not in OPTIONAL
