"""Sphinx extension: each page's <script> tags once.

Sphinx 7.4 adds an inline script registered with ``app.add_js_file(None, body=...)`` to a page twice
(sphinx-doc/sphinx#13402, fixed in Sphinx 8.2; jupyter-book 1.x needs Sphinx 7). sphinx-thebe registers its
``const THEBE_JS_URL = ...`` that way, so every page declared that constant twice and the browser logged
"Identifier 'THEBE_JS_URL' has already been declared" (tests/test_rendered_book.py reads the browser log).
This keeps the first of identical scripts (same file or body, same attributes)."""

from __future__ import annotations


def _key(script) -> tuple:
    """What the page's tag is made of: the file (None and "" both mean an inline script; the two copies
    differ in just that) and the attributes, the inline body among them."""
    filename = getattr(script, "filename", script)
    attributes = getattr(script, "attributes", {}) or {}
    return str(filename or ""), tuple(sorted((name, str(value)) for name, value in attributes.items()))


def unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        if _key(script) not in seen:
            seen.add(_key(script))
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    # priority 900: after the themes and extensions that add scripts in their own html-page-context handlers
    app.connect("html-page-context", unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
