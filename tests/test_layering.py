"""The layers import downwards only: the op vocabulary (``fxpar.ops``) binds to no process and
knows no pass; passes, rules and the analyses built on them call ops but never the runtime; the
runtime never reaches into the passes. Checked on the source, import by import (those inside
functions too), so that a shortcut shows here before it becomes a circle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where the installed package name of each top-level folder comes from
PACKAGES = {"fxpar": "fxpar", "passes": "fxpar.passes", "models": "fxpar.models"}


def modules():
    """``{module name: file}`` for every module of fxpar, its passes and models."""
    out = {}
    for folder, package in PACKAGES.items():
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(d, f)
    return out


def imports(name: str, path: str) -> set[str]:
    """The fxpar modules ``name`` imports (relative imports resolved)."""
    is_package = path.endswith("__init__.py")
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # ``from fxpar.ops import collectives``
    return {m for m in found if m.split(".")[0] in ("fxpar", "passes", "models")}


def below(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = {name: imports(name, path) for name, path in modules().items()}
PLANNING = ["fxpar.passes", "fxpar.rules", "fxpar.stages", "fxpar.memory", "fxpar.fake_values", "fxpar.layout_algebra",
            "fxpar.canonical", "fxpar.constants", "fxpar.shards", "fxpar.placement", "fxpar.metadata"]


def offenders(sources, forbidden) -> list[str]:
    return sorted(f"{name} imports {m}" for name, found in GRAPH.items() if below(name, sources)
                  for m in found if below(m, forbidden))


def test_the_op_layer_binds_to_nothing_above_it():
    above = ["fxpar.runtime", "fxpar.passes", "fxpar.rules", "fxpar.plan", "fxpar.parallelize", "fxpar.pipeline",
             "fxpar.checkpoint", "fxpar.capture", "passes", "models"]
    assert offenders(["fxpar.ops"], above) == []


def test_planning_never_imports_the_runtime():
    assert offenders(PLANNING, ["fxpar.runtime", "fxpar.checkpoint", "fxpar.plan", "fxpar.parallelize"]) == []


def test_the_runtime_never_imports_a_pass_or_a_front_end():
    # ParallelModule plans through fxpar.planning, as compile does: neither front end imports the other
    assert offenders(["fxpar.runtime"], ["fxpar.passes", "passes", "fxpar.pipeline", "fxpar.plan", "fxpar.parallelize"]) == []


def test_the_shard_geometry_binds_to_nothing():
    # Plan, ParallelModule and the checkpoints all ask it where a tensor lies: it can import none of them
    assert offenders(["fxpar.geometry"], ["fxpar.runtime", "fxpar.checkpoint", "fxpar.plan", "fxpar.parallelize"]) == []


def test_nothing_imports_the_folders_by_their_top_level_names():
    assert offenders(["fxpar"], ["passes", "models"]) == []


def test_the_check_sees_imports():
    # a test that cannot fail is a defect: the graph holds the imports these rules are about
    assert "fxpar.ops.collectives" in GRAPH["fxpar.passes.insert_collectives"]
    assert "fxpar.ops.context" in GRAPH["fxpar.ops.collectives"]
    assert any(below(m, ["fxpar.ops"]) for m in GRAPH["fxpar.runtime.module"])
    assert "fxpar.placement" in GRAPH["fxpar.geometry"]
