"""The package's shape, checked from its source: no import cycle, no module reaching into another's private names,
the driver/rank split (what only the Hydra process runs never imports what only the ranks run, and back), no file in
runner/ over 350 lines, and every method discoverable by its folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from runner import stages

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def module_name(path: Path) -> str:
    parts = path.relative_to(RUNNER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in RUNNER.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported from it, at module level?) for every runner import in a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runner"):
            names = [a.name for a in node.names]
            out.append((node.module, names, id(node) in top))
            out += [(f"{node.module}.{n}", [], id(node) in top) for n in names if f"{node.module}.{n}" in MODULES]
        elif isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names if a.name.startswith("runner")]
    return out


def graph(module_level_only: bool) -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, top in imports(path):
            if target in MODULES and target != name and (top or not module_level_only):
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def is_package_of(pkg: str, module: str) -> bool:
    return module == pkg or module.startswith(pkg + ".")


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module_level_only", [True, False])
def test_no_import_cycle(module_level_only):
    edges = graph(module_level_only)
    # a package's __init__ importing its own submodules is how a package exposes its API, not a cycle
    for name in edges:
        edges[name] = {t for t in edges[name] if not (MODULES[name].name == "__init__.py" and is_package_of(name, t))}
    assert cycles(edges) == []


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for name, path in MODULES.items():
        for target, names, _ in imports(path):
            offenders += [f"{name}: from {target} import {n}" for n in names if n.startswith("_") and n != "__future__"]
        tree = ast.parse(path.read_text())
        local_modules = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("runner")
            for a in n.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.value.id in local_modules
            ):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_driver_and_ranks_do_not_import_each_other():
    for name, path in MODULES.items():
        targets = [t for t, _, _ in imports(path)]
        if is_package_of("runner.driver", name):
            assert not [t for t in targets if is_package_of("runner.train", t)], name
        if is_package_of("runner.train", name):
            assert not [t for t in targets if is_package_of("runner.driver", t)], name


def test_no_file_over_350_lines():
    assert {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 350} == {}


def test_every_method_folder_is_a_method():
    names = stages.names()
    assert {"sft", "reward", "ppo"} <= set(names)
    for name in names:
        method = stages.get(name)
        assert method.name == name and method.recipe.startswith(f"runner.stages.{name}.")
        assert (RUNNER.parent / "conf" / "step" / f"{name}.yaml").is_file(), name


def test_every_recipe_named_anywhere_exists():
    root = RUNNER.parent
    texts = [*root.glob("conf/**/*.yaml"), *root.glob("recipes/*.yaml"), root / "README.md", root / "CONTRIBUTING.md"]
    named = {m for path in texts for m in re.findall(r"recipe=([\w.-]+)", path.read_text())}
    named -= {"NAME", "autotuned"}  # the placeholder in usage lines; the autotuner's own file (--config-dir TUNE_DIR)
    assert named and {n for n in named if not (root / "recipes" / f"{n}.yaml").is_file()} == set()


def test_the_readme_group_table_lists_every_option():
    """Every option of every config group is in the README's table (model presets and recipes are listed by
    pattern: `opt-125m … opt-66b`, `files in recipes/`; ZeRO's `stage0 … stage3` names the stages between)."""
    root = RUNNER.parent
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \| (.*?) \|", (root / "README.md").read_text(), re.MULTILINE)
    }
    for group in sorted(p.name for p in (root / "conf").iterdir() if p.is_dir()):
        if group in ("model", "recipe", "hydra"):
            continue
        assert group in rows, f"README's group table has no row for {group}"
        options = {p.stem for p in (root / "conf" / group).glob("*.yaml")}
        if group == "zero":
            options -= {"stage1", "stage2"}
        missing = {o for o in options if f"`{o}`" not in rows[group]}
        assert not missing, f"README's `{group}` row lacks {sorted(missing)}"


def test_bench_scripts_find_the_bench_package_when_run_as_scripts():
    """`python bench/X.py` puts bench/ on the path, not the repository: a script that imports `bench.…` (even lazily,
    as `--base REV` does) must put the repository on sys.path first, at module level."""
    for script in sorted((Path(__file__).parent.parent / "bench").glob("*.py")):
        text = script.read_text()
        first = re.search(r"^\s*from bench[._]", text, re.MULTILINE)
        if first and script.name != "_revisions.py":
            insert = re.search(r"^sys\.path\.insert\(0, ", text, re.MULTILINE)
            assert insert and insert.start() < first.start(), f"{script.name}: sys.path.insert before `from bench`"
