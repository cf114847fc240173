"""Imports sit at the top of their module unless a lazy import states why (issue 11).

An ``import`` inside a function passes when the statement carries a ``# lazy: <reason>`` comment (a circular
import, a heavy dependency kept out of a light entry point such as ``evlf --help``, an optional dependency), or
when the module docstring has a sentence saying why its imports are lazy (containing "import" and "lazy").
Static only: the files are parsed, never imported.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monailabel_evlf"


def _modules() -> list[tuple[str, Path]]:
    return sorted((path.relative_to(PACKAGE).as_posix(), path) for path in PACKAGE.rglob("*.py"))


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return found


def _lazy_comment_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT and re.match(r"#\s*lazy\b", t.string)}


def _docstring_explains(tree: ast.Module) -> bool:
    sentences = re.split(r"(?<=[.!?])\s+", ast.get_docstring(tree) or "")
    return any("import" in s.lower() and "lazy" in s.lower() for s in sentences)


def unexplained_lazy_imports(path: Path) -> list[str]:
    """``file:line: import`` for each import inside a function of ``path`` that gives no reason."""
    source = path.read_text()
    tree = ast.parse(source)
    imports = _function_imports(tree)
    if not imports or _docstring_explains(tree):
        return []
    commented = _lazy_comment_lines(source)
    return [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in imports
        if not commented.intersection(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    ]


def test_imports_inside_functions_state_why():
    problems = [
        f"monailabel_evlf/{relative.rsplit('/', 1)[0] + '/' if '/' in relative else ''}{line}"
        for relative, path in _modules()
        for line in unexplained_lazy_imports(path)
    ]
    assert not problems, (
        "imports inside functions without a reason; move them to the module top, or add '# lazy: <reason>' on the "
        "import line (circular import, heavy dependency of a light entry point, optional dependency):\n"
        + "\n".join(problems)
    )


def test_the_checker_sees_a_bare_lazy_import(tmp_path):
    bare = tmp_path / "bare.py"
    bare.write_text('"""A module."""\n\n\ndef f():\n    import json\n\n    return json\n')
    commented = tmp_path / "commented.py"
    commented.write_text('"""A module."""\n\n\ndef f():\n    import json  # lazy: a test\n\n    return json\n')
    explained = tmp_path / "explained.py"
    explained.write_text(
        '"""A module. Its imports are lazy: a test."""\n\n\ndef f():\n    import json\n\n    return json\n'
    )
    assert unexplained_lazy_imports(bare) == ["bare.py:5: import json"]
    assert unexplained_lazy_imports(commented) == []
    assert unexplained_lazy_imports(explained) == []
