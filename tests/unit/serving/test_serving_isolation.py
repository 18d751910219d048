"""serving/ must never import training/ or torch: the serving image has neither."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import serving

SERVING_DIR = Path(serving.__file__).resolve().parent
FORBIDDEN = ("training", "torch")


def serving_modules() -> list[str]:
    names = ["serving"]
    for info in pkgutil.walk_packages([str(SERVING_DIR)], prefix="serving."):
        names.append(info.name)
    return sorted(names)


def test_no_serving_source_mentions_training_or_torch_imports():
    offenders = []
    for path in SERVING_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(SERVING_DIR)}:{node.lineno} {m}" for m in modules
                          if m.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_every_serving_module_imports_with_training_and_torch_blocked():
    modules = serving_modules()
    assert {"serving.server", "serving.cli", "serving.client", "serving.repository.loader",
            "serving.models.operations", "serving.services.generative"} <= set(modules)
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {FORBIDDEN!r}:\n"
        "            raise ImportError('serving imported ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print('ok', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=SERVING_DIR.parent)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr
