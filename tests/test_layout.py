"""The layout the code promises (ivft/__init__.py, README "Read the code"): the library takes explicit
arguments, never train.py's flag dict; nothing patches sys.path (the project is installed with
`pip install -e .`); the library never imports the scripts; the code reads in one sitting, measured
by the longest function and the depth of train.py's step loop (no line budget: that pushed the step
out of the script)."""
import ast

import pytest

from conftest import ROOT

SCRIPTS = ["train.py", "evaluate.py", "extract_iv.py", "sample.py", "model.py"]
LONGEST_FUNCTION = 80


def py_files():
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_only_the_config_module_takes_the_flag_dict():
    takes_cfg = []
    for path in sorted((ROOT / "ivft").glob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                if "cfg" in names:
                    takes_cfg.append(f"{path.name}:{node.lineno} {node.name}")
    assert not takes_cfg, f"library functions that take train.py's cfg: {takes_cfg}"


def test_nothing_patches_sys_path():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in py_files() if p.name != "test_layout.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if "sys.path.insert" in line]
    assert not found, f"sys.path.insert (the project is installed with pip install -e .): {found}"


def test_the_library_never_imports_the_scripts():
    scripts = {"train", "evaluate", "extract_iv", "sample"}
    found = []
    for path in sorted((ROOT / "ivft").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in scripts]
    assert not found, found


def functions(path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_a_screen():
    paths = [ROOT / s for s in SCRIPTS] + sorted((ROOT / "ivft").glob("*.py"))
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in paths for f in functions(p) if f.end_lineno - f.lineno + 1 > LONGEST_FUNCTION]
    assert not long, f"functions over {LONGEST_FUNCTION} lines: {long}"


def nesting(node) -> int:
    """Depth of compound statements (for, while, with, try, if) from `node` down, `node` counting 1."""
    compound = (ast.For, ast.While, ast.With, ast.Try, ast.If)
    inner = [nesting(c) for c in ast.iter_child_nodes(node)]
    return (1 if isinstance(node, compound) else 0) + max(inner, default=0)


def test_the_step_is_in_train_py_and_its_loop_at_most_three_deep():
    tree = ast.parse((ROOT / "train.py").read_text())
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)
             and n.target.id == "step"]
    assert len(loops) == 1, "train.py must hold one `for step in ...` loop"
    assert nesting(loops[0]) <= 3, f"the step loop nests {nesting(loops[0])} levels deep (at most 3)"
    calls = {ast.unparse(n.func) for n in ast.walk(loops[0]) if isinstance(n, ast.Call)}
    # what a student comes for: the forward, the backward, the clip and the update, in the loop itself
    assert {"wrapped", "loss.backward", "torch.nn.utils.clip_grad_norm_", "opt.step"} <= calls, calls


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_have_few_long_lines(script):
    lines = (ROOT / script).read_text().splitlines()
    long = [i for i, line in enumerate(lines, 1) if len(line) > 110]
    assert len(long) <= 5, f"{script}: {len(long)} lines over 110 characters (lines {long[:10]})"


# The library's own modules and the scripts over it, as test_imports_are_acyclic_and_at_the_top reads them.
IMPORT_CHECKED = ["ivft/*.py", "model.py", "train.py", "evaluate.py", "extract_iv.py", "sample.py",
                  "experiments/*.py", "bench/*.py"]


def module_imports(tree: ast.Module) -> set[str]:
    """The project modules (ivft.x, model) that a module imports when it is imported: the statements
    outside any function, `if` and `try` blocks included."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out |= {a.name for a in child.names}
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.add(child.module)
                if child.module == "ivft":      # from ivft import tasks
                    out |= {f"ivft.{a.name}" for a in child.names}
    return {m for m in out if m == "model" or m.startswith("ivft.")}


def function_imports(tree: ast.Module):
    """The import statements inside a function body (at any depth)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_imports_are_acyclic_and_at_the_top():
    """(a) No import circle among the library's modules: a circle only works while some import in it
    is hidden inside a function, and breaks when someone moves that import up. (b) An import inside a
    function says why on its line or the line above (an optional or slow dependency: wandb,
    matplotlib, torch.distributed.checkpoint, fcntl)."""
    paths = sorted({p for pattern in IMPORT_CHECKED for p in ROOT.glob(pattern)})
    graph, unexplained = {}, []
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        tree = ast.parse(text)
        if rel.startswith("ivft/") or rel == "model.py":
            name = rel[:-3].replace("/", ".").removesuffix(".__init__")
            graph[name] = module_imports(tree)
        lines = text.splitlines()
        for node in function_imports(tree):
            here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            if "#" not in here and not above.startswith("#"):
                unexplained.append(f"{rel}:{node.lineno} {here.strip()}")
    assert len(graph) > 10 and "ivft.errors" in graph
    assert (cycle := find_cycle(graph)) is None, "import circle: " + " -> ".join(cycle)
    assert not unexplained, ("imports inside functions with no comment saying why (move them to the top, "
                             "or say why they must wait): " + "; ".join(unexplained))
