"""The layout's rules, read from the source: the ops layer has no import circle, the extension's loader
imports no op, no patch file grows past a reader's page count, and one function says whether Triton's
interpreter is on."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "llama_fast" / "ops"
OP_FILES = {p.stem for p in OPS.glob("*.py") if not p.stem.startswith("_")}


def _imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports, anywhere in it (functions included), as written (relative dots kept)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # `from . import x` -> ".x"; `from .x import y` -> ".x", ".x.y"
            base = "." * node.level + (node.module or "")
            joint = "" if base.endswith(".") else "."
            found |= {base} | {base + joint + alias.name for alias in node.names}
    return found


def test_the_ops_helpers_import_no_op():
    """Each op imports the helpers (_checks, _dispatch, _dtensor); a helper importing an op back made the
    circle a reader had to untangle."""
    for helper in OPS.glob("_*.py"):
        if helper.name == "__init__.py":
            continue
        ops = {f".{op}" for op in OP_FILES} | {f"llama_fast.ops.{op}" for op in OP_FILES}
        assert not ops & _imported_modules(helper), helper.name


def test_the_extension_loader_imports_no_op():
    """Each op file hands the extension its fakes and autograd (ops/_dispatch.KernelOp), not the reverse."""
    modules = _imported_modules(ROOT / "llama_fast" / "extension.py")
    assert not [m for m in modules if "ops" in m.split(".")], modules


def test_no_patch_file_is_over_300_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "llama_fast" / "patch").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


def test_one_interpreting_test():
    """Whether the interpreter is on is ``llama_fast.backend.interpreting()``'s to say; tests may set the
    variable (and a bench save and restore it), nothing else decides it."""
    readers = [str(p.relative_to(ROOT)) for folder in ("llama_fast", "kernels", "bench", "tests")
               for p in (ROOT / folder).rglob("*.py")
               if 'TRITON_INTERPRET", "0") not in' in p.read_text() and p.name != "test_structure.py"]
    assert readers == ["llama_fast/backend.py"]
