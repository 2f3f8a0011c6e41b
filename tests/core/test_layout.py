"""The package's structure: no import cycles, the core free of MXNet, one bind helper."""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set

from tests.paths import ROOT

PACKAGE = "mxnet_mirror_hook"


def _modules() -> Dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    base = os.path.join(ROOT, PACKAGE)
    for folder, _, files in os.walk(base):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: str, known: Set[str]) -> Set[str]:
    """Package modules that ``module`` imports at module level (not inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_package = path.endswith("__init__.py")
    targets: Set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith(PACKAGE):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in known else base)
    return {t for t in targets if t in known and t != module}


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_package_has_no_import_cycle():
    graph = _graph()
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_a_cycle_between_a_package_and_its_module(tmp_path):
    # The check above is only worth something if it can fail: a planner module importing
    # its package's __init__, which imports the planner back, is the cycle it must see.
    known = {f"{PACKAGE}.core.planners", f"{PACKAGE}.core.planners.auto"}
    init = tmp_path / "__init__.py"
    init.write_text("from . import auto\n")
    auto = tmp_path / "auto.py"
    auto.write_text("from . import register_planner\n")
    assert _imports(f"{PACKAGE}.core.planners", str(init), known) == {f"{PACKAGE}.core.planners.auto"}
    assert _imports(f"{PACKAGE}.core.planners.auto", str(auto), known) == {f"{PACKAGE}.core.planners"}


def test_only_the_bind_helper_calls_simple_bind_in_the_adapter():
    # mx/capi.py makes the same call through MXNet's C API for workers without the package
    # (NOTE [ binding without the mxnet package ]); tests/mx/test_capi_worker.py holds them equal.
    modules = _modules()
    callers = sorted(name for name, path in modules.items()
                     if name.startswith(f"{PACKAGE}.mx.") and "simple_bind(" in open(path).read())
    assert callers == [f"{PACKAGE}.mx.bind"]
    c_callers = sorted(name for name, path in modules.items()
                       if "MXExecutorSimpleBind" in open(path).read() and name.startswith(PACKAGE))
    assert c_callers == [f"{PACKAGE}.mx.capi"]


def test_the_bind_helper_imports_nothing_else_from_the_adapter_but_its_pure_helpers():
    graph = _graph()
    assert {t for t in graph[f"{PACKAGE}.mx.bind"] if t.startswith(f"{PACKAGE}.mx.")} <= {
        f"{PACKAGE}.mx.text", f"{PACKAGE}.mx.process"}


def test_a_measuring_worker_imports_no_mxnet():
    import subprocess
    import sys

    code = ("import sys, mxnet_mirror_hook.mx.worker, mxnet_mirror_hook.mx.capi, "
            "mxnet_mirror_hook.mx.text; print('mxnet' in sys.modules, 'numpy' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["False", "False"]


def test_the_core_imports_nothing_outside_itself_but_errors():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith(f"{PACKAGE}.core"):
            outside = {t for t in targets if not t.startswith(f"{PACKAGE}.core")}
            assert outside <= {f"{PACKAGE}.errors"}, (name, outside)


def test_only_env_reads_the_environment():
    modules = _modules()
    readers = sorted(name for name, path in modules.items()
                     if "os.environ.get(" in open(path).read() or "os.getenv(" in open(path).read())
    assert readers == [f"{PACKAGE}.env"], readers


#: Module-level names a Gluon hook module may bind: constants, the logger, ``__all__``, TypeVars and
#: the one registry object (an instance of a ``...Registry`` class).
_IMMUTABLE_CALLS = {"getLogger", "TypeVar", "frozenset", "tuple"}


def _mutable_globals(path: str) -> List[str]:
    """Module-level names of ``path`` bound to possibly mutable values, and ``global`` statements."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in tree.body:
        targets: List[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.AugAssign):
            targets, value = [node.target], node.value
        names = [t.id if isinstance(t, ast.Name) else ast.unparse(t) for t in targets]
        if not names or names == ["__all__"] or _immutable(value):
            continue
        found.extend(names)
    found.extend(f"global {name}" for node in ast.walk(tree) if isinstance(node, ast.Global)
                 for name in node.names)
    return found


def _immutable(value: ast.expr) -> bool:
    if isinstance(value, ast.Constant):
        return True
    if isinstance(value, ast.Tuple):
        return all(_immutable(element) for element in value.elts)
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in _IMMUTABLE_CALLS or name.endswith("Registry")
    return False


def test_the_gluon_hook_modules_keep_no_mutable_module_globals():
    # The autograd wrap, the pending forwards and the mirrored blocks live in one HookRegistry
    # object (gluon/hooks.py), not in module-level lists, dicts and counters.
    modules = _modules()
    gluon = {name: path for name, path in modules.items() if name.startswith(f"{PACKAGE}.gluon")}
    assert f"{PACKAGE}.gluon.hooks" in gluon and len(gluon) > 2, sorted(gluon)
    offenders = {name: found for name, path in gluon.items() if (found := _mutable_globals(path))}
    assert not offenders, offenders
    assert len(re.findall(r"^\w+ = \w*Registry\(\)", open(gluon[f"{PACKAGE}.gluon.hooks"]).read(),
                          re.MULTILINE)) == 1


def test_the_globals_check_sees_lists_counters_and_global_statements(tmp_path):
    module = tmp_path / "hooks.py"
    module.write_text("import itertools\nimport logging\n__all__ = ['f']\n"
                      "logger = logging.getLogger(__name__)\nLIMIT = 32\nNAMES = ('a', 'b')\n"
                      "REGISTRY = HookRegistry()\n_PENDING = []\n_ORIGINALS: dict = {}\n"
                      "_SEQUENCE = itertools.count()\ndef f():\n    global LIMIT\n    LIMIT = 1\n")
    assert _mutable_globals(str(module)) == ["_PENDING", "_ORIGINALS", "_SEQUENCE", "global LIMIT"]


#: The segment packages (NOTE [ executor segments ]): the pure core and the MXNet adapter.
_SEGMENT_PACKAGES = (f"{PACKAGE}.core.segments", f"{PACKAGE}.mx.segments")

#: Outside them, segment code is only called: by planning, and by the surfaces that bind a chain
#: (Module's executor group, bucketing, Gluon's binding).
_SEGMENT_CALLERS = (f"{PACKAGE}.planning", f"{PACKAGE}.module", f"{PACKAGE}.bucketing", f"{PACKAGE}.gluon")

#: Classes of the segment machinery are named so (a plan, a spec, a chain, its layout, a head...).
_SEGMENT_CLASS = re.compile(r"Segment|Chunked|ChainLayout|HeadArrays|GatherLayout|LossHead|TensorSpec")

#: Classes outside the segment packages whose names match: the cut-set DP's schedule pieces (one
#: level's planning, another concept) and planning's private error for a failing segment path.
_OTHER_SEGMENT_CLASSES = {f"{PACKAGE}.core.planners.dp": {"Segment"},
                          f"{PACKAGE}.planning.segments": {"_SegmentPathError"}}


def _in_segment_packages(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _SEGMENT_PACKAGES)


def _all_imports(module: str, path: str) -> Set[str]:
    """Package modules ``module`` imports anywhere (also inside functions), as written."""
    is_package = path.endswith("__init__.py")
    found: Set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                found.add(".".join(anchor + ([node.module] if node.module else [])))
            elif (node.module or "").startswith(PACKAGE):
                found.add(node.module)
    return found


def test_segment_code_is_called_only_by_planning_and_the_binding_surfaces():
    # Outside core/segments/ and mx/segments/ only planning reaches into their modules; the
    # binding surfaces use what the packages' __init__ re-export.
    for name, path in _modules().items():
        if _in_segment_packages(name):
            continue
        used = {t for t in _all_imports(name, path) if _in_segment_packages(t)}
        if not used:
            continue
        assert name.startswith(_SEGMENT_CALLERS), (name, used)
        if not name.startswith(f"{PACKAGE}.planning"):
            assert used <= set(_SEGMENT_PACKAGES), (name, used - set(_SEGMENT_PACKAGES))


def test_no_module_outside_the_segment_packages_defines_segment_classes():
    for name, path in _modules().items():
        if _in_segment_packages(name):
            continue
        classes = {node.name for node in ast.walk(ast.parse(open(path, encoding="utf-8").read()))
                   if isinstance(node, ast.ClassDef) and _SEGMENT_CLASS.search(node.name)}
        assert classes <= _OTHER_SEGMENT_CLASSES.get(name, set()), (name, classes)


def test_the_segment_import_check_sees_a_reach_into_a_segment_module(tmp_path):
    # The first check above is only worth something if it sees an import of a private module.
    source = tmp_path / "runner.py"
    source.write_text("def f():\n    from .mx.segments.chain import SegmentChain\n")
    assert _all_imports(f"{PACKAGE}.runner", str(source)) == {f"{PACKAGE}.mx.segments.chain"}
