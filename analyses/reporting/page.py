"""The report page as data, rendered by Jinja2 templates into HTML and its Markdown twin.

A report section is a list of :data:`Item` dicts made by the small constructors here (``heading``,
``paragraph``, ``table``, ``figure``, ``link``, ``files``, ``cards``, ``verdict``); every value in
an item is plain text (cells already formatted). :func:`render` turns the items into the page
through ``templates/report.html.j2`` (autoescaped: data-set text can hold no markup) and
``templates/report.md.j2`` (every text through the ``md`` filter, which escapes HTML and Markdown
punctuation). The HTML page is self-contained: inline CSS, figures as data URIs, no scripts.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

Item = dict[str, Any]
"""One block of the page: ``{"kind": "heading" | "paragraph" | "table" | ..., ...its texts}``."""
NOT_APPLICABLE = "n/a"
"""How the report shows a metric that does not apply (NaN or None in the data), never as 0."""
TEMPLATES = Path(__file__).parent / "templates"


def md_text(text: Any) -> str:
    """Text for Markdown: HTML-escaped, Markdown punctuation and table pipes escaped, on one line."""
    escaped = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", escaped).replace("\n", " ")


def format_value(value: Any, formatter: Callable[[Any], str] | None) -> str:
    """A cell's text: yes/no for booleans, :data:`NOT_APPLICABLE` for missing numbers, else ``formatter``."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return NOT_APPLICABLE
    if formatter is not None and isinstance(value, (int, float, np.number)):
        return formatter(value)
    return str(value)


def heading(text: str, anchor: str) -> Item:
    """A section heading; ``anchor`` is its id in the page and its entry in the navigation bar."""
    return {"kind": "heading", "text": text, "anchor": anchor}


def paragraph(text: str) -> Item:
    return {"kind": "paragraph", "text": text}


def table(frame: pd.DataFrame, formats: Mapping[str, Callable[[Any], str]] | None = None,
          default: Callable[[Any], str] | None = lambda v: f"{v:.4g}") -> Item:
    """``frame`` as a table: each column's numbers through ``formats[column]`` (else ``default``)."""
    formats = formats or {}
    rows = [[format_value(v, formats.get(c, default)) for c, v in zip(frame.columns, row)]
            for row in frame.itertuples(index=False, name=None)]
    return {"kind": "table", "columns": [str(c) for c in frame.columns], "rows": rows}


def figure(png: bytes, name: str, caption: str) -> Item:
    """A PNG figure: embedded in the HTML, linked as ``figures/<name>`` from the Markdown."""
    return {"kind": "figure", "uri": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
            "name": name, "caption": caption}


def link(text: str, href: str, note: str = "") -> Item:
    return {"kind": "link", "text": text, "href": href, "note": note}


def files(names: Sequence[str]) -> Item:
    """The files of the report folder, each linked."""
    return {"kind": "files", "names": list(names)}


def cards(entries: Sequence[tuple[str, str, str]]) -> Item:
    """Headline numbers: ``(label, value, detail)`` each."""
    return {"kind": "cards", "cards": [{"label": a, "value": b, "detail": c} for a, b, c in entries]}


VERDICT_STYLES = {"holds": "ok", "partly holds": "warn", "not resolved at this n": "warn", "does not hold": "bad"}


def verdict(claim: Mapping[str, Any]) -> Item:
    """A checked claim: its text, verdict and the measured statement behind it."""
    return {"kind": "claim", "claim": claim["claim"], "verdict": claim["verdict"], "statement": claim["statement"],
            "style": VERDICT_STYLES.get(claim["verdict"], "none")}


@cache
def _environments() -> tuple[jinja2.Environment, jinja2.Environment]:
    loader = jinja2.FileSystemLoader(TEMPLATES)
    page = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)
    markdown = jinja2.Environment(loader=loader, autoescape=False, undefined=jinja2.StrictUndefined,
                                  trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    markdown.filters["md"] = md_text
    return page, markdown


def render(title: str, subtitle: str, items: Sequence[Item]) -> tuple[str, str]:
    """The page ``(html, markdown)`` of ``items`` under ``title`` and ``subtitle``."""
    page, markdown = _environments()
    unknown = sorted({item["kind"] for item in items} - KINDS)
    if unknown:
        raise ValueError(f"report items of unknown kind {unknown}; make them with the constructors of "
                         "analyses.reporting.page")
    context = {"title": title, "subtitle": subtitle, "items": list(items),
               "sections": [item for item in items if item["kind"] == "heading"]}
    return (page.get_template("report.html.j2").render(context),
            markdown.get_template("report.md.j2").render(context))


KINDS = {"heading", "paragraph", "table", "figure", "link", "files", "cards", "claim"}
