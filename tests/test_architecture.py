"""The import rules of docs/architecture.rst hold for the code.

The rules are read from the page itself, so the page cannot drift from the
code: a new module, or an import that breaks a layer, fails here until the
page says it is allowed.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparse_dict"
PAGE = ROOT / "docs" / "architecture.rst"


def _rules():
    text = PAGE.read_text(encoding="utf-8")
    block = text.split(".. import-rules-start")[1].split(".. import-rules-end")[0]
    rules = {}
    for line in block.splitlines():
        match = re.match(r"^\s+(sparse_dict[\w.*]*)\s+->\s+(.*)$", line)
        if not match:
            continue
        allowed, _, forbidden = match.group(2).partition(";")
        allowed = [] if "(nothing)" in allowed else [a.strip() for a in allowed.split(",")]
        banned = re.findall(r"not (\w+)", forbidden)
        rules[match.group(1)] = (allowed, banned)
    return rules


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path, module):
    """(imported module, at top level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from sparse_dict import metrics" imports sparse_dict.metrics.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in _MODULES else base
                     for a in node.names]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names]
    return found


_MODULES = _modules()


def _matches(pattern, name):
    if pattern.endswith(".*"):
        return name == pattern[:-2] or name.startswith(pattern[:-1])
    return name == pattern


def _rule_for(module, rules):
    exact = [p for p in rules if p == module]
    if exact:
        return rules[exact[0]]
    wildcard = sorted((p for p in rules if _matches(p, module)), key=len, reverse=True)
    return rules[wildcard[0]] if wildcard else None


def test_every_module_has_a_rule():
    rules = _rules()
    assert len(rules) > 10  # the page's block was found and read
    missing = [m for m in _MODULES if _rule_for(m, rules) is None]
    assert not missing, f"docs/architecture.rst has no import rule for {missing}"


@pytest.mark.parametrize("module", sorted(_MODULES))
def test_imports_follow_the_rules(module):
    allowed, banned = _rule_for(module, _rules())
    bad = []
    for name, _ in _imports(_MODULES[module], module):
        top = name.split(".")[0]
        if top in banned:
            bad.append(f"{name} (not {top} in {module})")
        if top != "sparse_dict" or name == module:
            continue
        if _matches(module.rpartition(".")[0] + ".*", name) and module.count(".") > 1:
            continue  # a module's siblings inside its own subpackage
        if not any(_matches(pattern, name) for pattern in allowed):
            bad.append(name)
    assert not bad, f"{module} imports what docs/architecture.rst does not allow: {bad}"


def test_no_import_cycles_at_module_level():
    graph = {
        m: {n for n, top in _imports(p, m) if top and n in _MODULES and n != m}
        for m, p in _MODULES.items()
    }
    # A package imports its own submodules to re-export them; that is not a cycle.
    for m in graph:
        graph[m] = {n for n in graph[m] if not (n.startswith(m + ".") and m + "." in n)}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_rules_can_fail(tmp_path):
    """A forbidden import is caught (the checks above are not vacuous)."""
    fake = tmp_path / "metrics.py"
    fake.write_text("import torch\nfrom sparse_dict.estimator import SparseAutoencoderDictionary\n")
    allowed, banned = _rule_for("sparse_dict.metrics", _rules())
    names = [n for n, _ in _imports(fake, "sparse_dict.metrics")]
    assert "torch" in banned and "torch" in names
    assert not any(_matches(p, "sparse_dict.estimator") for p in allowed)


def _text_calls_without_encoding(path):
    """Lines of ``path`` that open text without naming its encoding."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        keywords = {k.arg for k in node.keywords}
        if "encoding" in keywords:
            continue
        if name in ("read_text", "write_text"):
            found.append(node.lineno)
        elif name == "open" and not (isinstance(func, ast.Attribute)
                                     and getattr(func.value, "id", "") == "os"):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
            if not binary:
                found.append(node.lineno)
    return found


def test_every_text_file_names_its_encoding():
    # Without encoding=, text is read and written in the locale's encoding:
    # cp1252 on Windows, ASCII under LANG=C without UTF-8 mode, where the
    # corpus, byte-level tokens ('Ġ') and the benchmarks' tables break.
    missing = {
        str(path.relative_to(ROOT)): lines
        for folder in (PACKAGE, ROOT / "benchmarks")
        for path in sorted(folder.rglob("*.py"))
        if (lines := _text_calls_without_encoding(path))
    }
    assert not missing, missing
