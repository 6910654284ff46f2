"""MkDocs hooks: make the docstrings' reStructuredText habits read well on the site.

The docstrings are plain prose that name other objects with Sphinx roles
(:class:`LocalGovernor`) and open examples with ``Example::``. Rendered as Markdown,
the role's prefix would show as text: drop it, and link the name when the site
documents it (an optional cross-reference: an unknown name stays plain code).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|data|mod|meth|attr|exc|obj):<code>~?([\w.]+)</code>")
_EXAMPLE = re.compile(r"<p>(Examples?)::</p>")


def _identifier(name: str) -> str:
    if name.startswith("sa."):
        return "sora_async." + name[3:]
    if name.startswith("sora_async"):
        return name
    return "sora_async." + name


def _link(match: re.Match[str]) -> str:
    name = match.group(1)
    return f'<autoref identifier="{_identifier(name)}" optional><code>{name}</code></autoref>'


def on_page_content(html: str, **_: Any) -> str:
    html = _ROLE.sub(_link, html)
    return _EXAMPLE.sub(r"<p>\1:</p>", html)
