"""The library's shape: its import graph has no circle, never climbs a floor, hides no import in a function;
no module is over 500 lines; every command answers --help with a description for every flag."""
import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "rrt"

# The floors, bottom first (README, "Architecture"): a module may import its own floor and the ones below.
FLOORS = [
    # 0: the spec, and what needs nothing of rrt
    {"rrt.spec", "rrt.devices", "rrt.losses", "rrt.rundir", "rrt.caches", "rrt.progress", "rrt.recipes", "rrt.params",
     "rrt.tasks", "rrt.tasks.utils", "rrt.paper", "rrt.verdicts"},
    {"rrt.families", "rrt.data", "rrt.shards"},                          # 1: per-family facts, corpora, shards
    {"rrt.relax"},                                                       # 2: per-loop LoRA
    {"rrt.recursive"},                                                   # 3: conversion
    {"rrt.checkpoint"},                                                  # 4: save / load
    {"rrt.models", "rrt.trainconfig", "rrt.evaluation", "rrt.exits"},   # 5: loading, the schema, eval, exits
    # 6: the core's engines: training and serving
    {"rrt.train", "rrt.train.build", "rrt.train.resume", "rrt.train.loop", "rrt.serving", "rrt.serving.kv",
     "rrt.serving.packed", "rrt.serving.rows", "rrt.serving.requests", "rrt.serving.engine",
     "rrt.serving.reference", "rrt.serving.baselines", "rrt.serving.workload", "rrt.serving.simulate",
     "rrt.serving.scoring", "rrt.serving.bounds", "rrt.serving.targets", "rrt.serving.bench"},
    {"rrt.runs", "rrt.runs.store", "rrt.runs.cost", "rrt.runs.memory", "rrt.runs.execute"},  # 7: the run layer
    {"rrt.study", "rrt.plans"},                                          # 8: the studies
    # 9: what a notebook calls around them: parameters, serving study, views, tables, figures, jobs
    {"rrt.notebook", "rrt.suite", "rrt.serving.study", "rrt.explore", "rrt.tables", "rrt.plots", "rrt.plots_base",
     "rrt.plots_serving", "rrt.plots_paper", "rrt.tables_paper", "rrt.tables_style", "rrt.report", "rrt.sweep",
     "rrt.gpucheck", "rrt.examples", "rrt.evidence", "rrt.claims"},
    # 10: the command lines and the public package
    {"rrt.cli", "rrt.cliargs", "rrt.nbrun", "rrt.__main__", "rrt.train.__main__", "rrt.runs.__main__", "rrt"},
]
FLOOR = {m: i for i, mods in enumerate(FLOORS) for m in mods}


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} for every module of lib/rrt."""
    out = {}
    for path in LIB.rglob("*.py"):
        parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def imports() -> list[tuple[str, str, bool]]:
    """Every rrt import as (importer, imported module, inside a function); TYPE_CHECKING blocks left out."""
    mods, found = modules(), []

    def target(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    for name, (path, package) in mods.items():
        def walk(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend((name, target(a.name), in_function) for a in child.names
                                 if a.name == "rrt" or a.name.startswith("rrt."))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        pkg = name.split(".") if package else name.split(".")[:-1]
                        base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                    if base == "rrt" or base.startswith("rrt."):
                        found.extend((name, target(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base),
                                      in_function) for a in child.names)
                walk(child, inside)
        walk(ast.parse(path.read_text()), False)
    return [(a, b, f) for a, b, f in found if a != b]


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package __init__s left out."""
    mods = modules()
    graph = {m: set() for m, (_, package) in mods.items() if not package}
    for a, b in edges:
        if a in graph and b in graph:
            graph[a].add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor():
    assert sorted(set(modules()) - set(FLOOR)) == [], "place new modules on a floor in FLOORS (and the README)"
    assert sorted(set(FLOOR) - set(modules())) == []


def test_the_import_graph_has_no_circle():
    assert cycles([(a, b) for a, b, _ in imports()]) == []


def test_no_import_climbs_a_floor():
    upward = sorted({f"{a} (floor {FLOOR[a]}) -> {b} (floor {FLOOR[b]})" for a, b, _ in imports()
                     if FLOOR[b] > FLOOR[a]})
    assert upward == []


def test_no_rrt_import_hides_in_a_function():
    assert sorted({f"{a} -> {b}" for a, b, inside in imports() if inside}) == []


def test_the_graph_sees_what_it_must_refuse(tmp_path, monkeypatch):
    """The checks are not vacuous: a circle, a climb and a hidden import planted in a copy are all found."""
    lib = tmp_path / "rrt"
    lib.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "spec.py").write_text("from rrt.cli import main\n")
    (lib / "cli.py").write_text("from rrt.spec import x\ndef f():\n    import rrt.spec\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", lib)
    found = imports()
    assert cycles([(a, b) for a, b, _ in found]) == [["rrt.cli", "rrt.spec"]]
    assert any(FLOOR[b] > FLOOR[a] for a, b, _ in found) and any(inside for *_, inside in found)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p, _ in modules().values() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_every_dataclass_flag_takes_its_fields_documentation():
    from rrt.cli import train_parser
    from rrt.cliargs import field_help
    from rrt.runs.store import DataSpec
    from rrt.trainconfig import TrainConfig

    docs = {**field_help(DataSpec), **field_help(TrainConfig)}  # --seq-len is TrainConfig's
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    assert docs["teacher"].endswith("(App. L: the full-size model uptrained alike)")  # a continued comment, joined
    actions = {a.dest: a for a in train_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(docs) <= set(actions)
    for name, help_text in docs.items():
        assert actions[name].help.startswith(help_text), name
        assert actions[name].help.endswith("(required)" if actions[name].required else ")"), name


def test_every_flag_of_every_command_has_a_description():
    from rrt.cli import PARSERS

    for command, parser in PARSERS.items():
        for action in parser()._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 8, (command, action.dest)
