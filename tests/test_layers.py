"""Imports flow one way: each package imports only the packages below it, never a peer or one above.

The rule is the table in ``gridpresence/__init__.py`` (LAYERS). This test reads every module's
source with ``ast``: module-level imports, imports under ``TYPE_CHECKING`` and imports inside
functions count alike, because a cycle a reader has to follow is a cycle even when the
interpreter does not trip on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gridpresence
from gridpresence import LAYERS

SRC = Path(gridpresence.__file__).resolve().parent


def _package(module: str) -> str:
    """The top-level part under gridpresence: 'device' for gridpresence.device.chat."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every gridpresence import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    own = _module_name(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gridpresence")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = own.split(".")[: len(own.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "gridpresence":  # `from gridpresence import x` imports gridpresence.x
                found += [(node.lineno, f"gridpresence.{a.name}") for a in node.names]
            elif module.startswith("gridpresence."):
                found.append((node.lineno, module))
    return found


def _rank() -> dict[str, int]:
    return {pkg: level for level, pkgs in enumerate(LAYERS) for pkg in pkgs}


def forbidden_edges() -> list[str]:
    rank = _rank()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        here = _module_name(path)
        src_pkg = _package(here)
        if here == "gridpresence":
            continue  # the package's own __init__: the version and this table, nothing imported
        if src_pkg not in rank:
            problems.append(f"{here} is in no layer: add its package to gridpresence.LAYERS")
            continue
        for line, target in _imports(path):
            dst_pkg = _package(target)
            if dst_pkg == src_pkg or dst_pkg == "":
                continue
            if dst_pkg not in rank:
                problems.append(f"{here}:{line} imports {target}, which is in no layer")
            elif rank[dst_pkg] == rank[src_pkg]:
                problems.append(f"{here}:{line} imports {target}: {src_pkg} and {dst_pkg} are peers "
                                f"and must not import each other")
            elif rank[dst_pkg] > rank[src_pkg]:
                problems.append(f"{here}:{line} imports {target}: {src_pkg} is below {dst_pkg} and may not "
                                f"import upwards")
    return problems


def test_imports_flow_one_way() -> None:
    problems = forbidden_edges()
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_every_package_states_what_it_may_import() -> None:
    missing = [p.parent.name for p in sorted(SRC.glob("*/__init__.py"))
               if "may import" not in (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").lower()]
    assert not missing, f"packages whose __init__ does not say what they may import: {missing}"


def test_desks_know_the_device_only_through_its_protocol() -> None:
    """A desk is given the device as ``device.desks.DeviceHost``; only the device builds desks."""
    agent = "gridpresence.device.agent"
    offenders = [f"{_module_name(p)}:{line} imports {target}"
                 for p in sorted((SRC / "device").glob("*.py")) if _module_name(p) not in (agent, "gridpresence.device")
                 for line, target in _imports(p) if target == agent]
    assert not offenders, "desks must use the DeviceHost protocol, not the device class:\n" + "\n".join(offenders)


def test_the_rule_catches_an_upward_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a protocol module importing the operator library is reported by name."""
    fake = tmp_path / "gridpresence"
    (fake / "protocol").mkdir(parents=True)
    (fake / "protocol" / "__init__.py").write_text('"""May import: nothing."""\n')
    (fake / "protocol" / "bad.py").write_text("def f():\n    from gridpresence.operator import GridOperator\n")
    (fake / "operator").mkdir()
    (fake / "operator" / "__init__.py").write_text('"""May import: protocol."""\n')
    monkeypatch.setattr(__name__ + ".SRC", fake)
    assert forbidden_edges() == ["gridpresence.protocol.bad:2 imports gridpresence.operator: protocol is below "
                                 "operator and may not import upwards"]
