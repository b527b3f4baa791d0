"""The README is the front door: its links to functions are true, and it stays short."""
import os
import re

from conftest import ROOT


def test_readme_links_name_functions_that_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    links = re.findall(r"\[`([\w.]+)`\]\(([\w/]+\.py)\)", text)
    assert len(links) >= 8
    for name, path in links:
        src = open(os.path.join(ROOT, path), encoding="utf-8").read()
        last = name.split(".")[-1]
        assert re.search(rf"^\s*(def|class) {last}\b", src, re.M), (name, path)


def test_readme_is_short_and_docs_links_resolve():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode("utf-8")) <= 10_500
    for target in re.findall(r"\]\((docs/[\w./-]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target


def cited_names():
    """Every name docs/*.md, README.md and our modules' docstrings cite in backticks: (where, name)."""
    import ast
    import glob

    texts = [(p, open(p, encoding="utf-8").read()) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    texts.append((os.path.join(ROOT, "README.md"), open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()))
    for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")):
        tree = ast.parse(open(p, encoding="utf-8").read())
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        texts.append((p, "\n".join(d for d in docs if d)))
    for where, text in texts:
        for name in re.findall(r"`+([A-Za-z_][\w.]*)(?:\(\))?`+", text):
            yield os.path.relpath(where, ROOT), name


def code_words(src: str) -> set:
    """The names and string words of a module's code, without its docstrings and comments."""
    import ast

    tree = ast.parse(src)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            words.add(n.id)
        elif isinstance(n, ast.Attribute):
            words.add(n.attr)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            words.add(n.name)
        elif isinstance(n, ast.arg):
            words.add(n.arg)
        elif isinstance(n, ast.keyword) and n.arg:
            words.add(n.arg)
        elif isinstance(n, ast.alias):
            words.update((n.asname or n.name).split("."))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            words.update(re.findall(r"\w+", n.value))
    return words


def test_every_name_the_docs_cite_exists():
    """A function, class or constant named in backticks, in the docs or a docstring, exists: ``module.name`` in
    that module (one of ours), a bare snake_case or CamelCase name somewhere in our code. (A docstring that
    named removed functions misled readers.)"""
    import glob

    def read(folder, prefix=""):  # why prefixed: bench/contrastive.py must not hide contrastive.py
        return {prefix + os.path.splitext(os.path.basename(p))[0]: open(p, encoding="utf-8").read()
                for p in glob.glob(os.path.join(ROOT, folder, "*.py"))}

    sources = {**read("bench", "bench."), **read("tests", "tests."), **read(".")}
    everything = "\n".join(sources.values())
    identifiers = set().union(*(code_words(src) for src in sources.values())) | {k.split(".")[-1] for k in sources}
    missing = []
    for where, name in cited_names():
        if re.search(r"\.(py|md|json|jsonl|csv|safetensors|txt|tiktoken|png|lock|tmp|pt)$", name):
            continue  # a file name, not a code name
        head, _, last = name.rpartition(".")
        module = head if head in sources else head.split(".")[-1]
        if module in sources:  # module.name, or Class.name in a module
            if not re.search(rf"^\s*(def|class) {last}\b|^\s*{last}\s*[:=]", sources[module], re.M):
                missing.append((where, name))
        elif head and re.search(rf"^class {head.split('.')[-1]}\b", everything, re.M):  # Class.method
            owner = next(src for src in sources.values() if re.search(rf"^class {head.split('.')[-1]}\b", src, re.M))
            if not re.search(rf"^\s*(def|class) {last}\b|^\s*{last}\s*[:=]", owner, re.M):
                missing.append((where, name))
        elif not head and ("_" in name.strip("_") or re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*", name)):
            if name not in identifiers:
                missing.append((where, name))
    assert not missing, missing
