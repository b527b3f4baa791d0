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
