"""The documentation's promises, checked without building the site: every public name
has a reference entry, and every relative link in the README and the guides leads to a
file."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import sora_async
import sora_async.otel
import sora_async.testing

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = [sora_async, sora_async.testing, sora_async.otel]

# A Markdown link or image target: [text](target) with no scheme.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.DOTALL | re.MULTILINE)


def reference_identifiers() -> list[str]:
    """The ``::: dotted.path`` blocks of the reference pages."""
    found: list[str] = []
    for page in sorted((DOCS / "reference").glob("*.md")):
        found += re.findall(r"^::: *([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE)
    return found


def resolve(identifier: str) -> object:
    """Import ``a.b.Name`` the way mkdocstrings finds it: the longest importable module,
    then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(identifier)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda module: module.__name__)
def test_every_public_name_has_a_reference_entry(module: object) -> None:
    """Each name in ``__all__`` of sora_async, sora_async.testing and sora_async.otel is
    documented by a ``:::`` block that resolves to that very object."""
    documented = {}
    for identifier in reference_identifiers():
        documented.setdefault(identifier.rpartition(".")[2], []).append(identifier)
    missing = []
    for name in module.__all__:  # type: ignore[attr-defined]
        public = getattr(module, name)
        if not any(resolve(ident) is public for ident in documented.get(name, [])):
            missing.append(name)
    assert not missing, f"{module.__name__}: no reference entry for {missing}"


def test_every_reference_entry_resolves() -> None:
    """A ``:::`` block names an object that exists (a stale entry would fail the build)."""
    for identifier in reference_identifiers():
        resolve(identifier)


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans hold no links
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")
    ]


@pytest.mark.parametrize(
    "page",
    [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))],
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_relative_links_lead_to_files(page: Path) -> None:
    """Every relative link in the README and the docs pages names a file that exists (the
    README's links into docs/ work on GitHub and in the site alike)."""
    broken = [
        target
        for target in relative_links(page)
        if not (page.parent / target.partition("#")[0]).is_file()
    ]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_stays_a_front_door() -> None:
    """The README is short and says how to read the site."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert 'pip install -e ".[docs]" && mkdocs serve' in readme


def test_the_docs_show_the_readmes_tested_scripts() -> None:
    """The quick start and the models page carry the README's two scripts as written, so
    the copies on the site are the ones tests/test_readme.py runs."""
    blocks = re.findall(r"```python\n.*?```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    for marker, page in [
        ("FakeApixo(generation_time", "quickstart.md"),
        ("max_concurrent_tasks_by_model", "models.md"),
    ]:
        (block,) = [block for block in blocks if marker in block]
        assert block in (DOCS / page).read_text(), page
