"""Imports run one way: fasttrain.format (the packed format) sits below the converters that write
it and the loaders that read it, and those two never import each other; fasttrain.pool sits below
all three; the training core (fasttrain.train) imports no evaluation, serving, workflow or
benchmark module. Checked on the source (ast), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> the package its modules import as (converters/ installs as fasttrain.converters)
PACKAGES = {"fasttrain/format": "fasttrain.format", "fasttrain/data": "fasttrain.data",
            "converters": "fasttrain.converters", "fasttrain/train": "fasttrain.train"}
FORBIDDEN = {
    "fasttrain.format": ("fasttrain.converters", "fasttrain.data"),
    "fasttrain.data": ("fasttrain.converters",),
    "fasttrain.converters": ("fasttrain.data",),
    "fasttrain.pool": ("fasttrain.format", "fasttrain.converters", "fasttrain.data"),
    # the training core: what a run measures (eval), serves and orchestrates sits above it
    "fasttrain.train": ("fasttrain.eval", "fasttrain.serve", "fasttrain.workflows", "fasttrain.bench"),
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports (absolute names; `from X import name` also as X.name, since the
    name may be a submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            yield path, package
    yield ROOT / "fasttrain" / "pool.py", "fasttrain"


def violations(path: Path, package: str) -> list[str]:
    own = "fasttrain.pool" if path.name == "pool.py" and package == "fasttrain" else package
    banned = FORBIDDEN[own]
    return sorted(m for m in imported_modules(path, package)
                  if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("path,package", list(modules()), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_imports_run_one_way(path, package):
    assert violations(path, package) == [], f"{path.relative_to(ROOT)} imports upwards or sideways"


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from ..data import mixture\n"
                 "def g():\n    from fasttrain.converters.common import ConvertError\n")
    assert imported_modules(f, "fasttrain.format") >= {"fasttrain.data", "fasttrain.data.mixture",
                                                       "fasttrain.converters.common"}
    assert violations(f, "fasttrain.format") == ["fasttrain.converters.common",
                                                 "fasttrain.converters.common.ConvertError",
                                                 "fasttrain.data", "fasttrain.data.mixture"]
