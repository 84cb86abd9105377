"""HTML building blocks of the report and the page itself (template.html, filled with string.Template).

Every function here escapes what it is given as text: only arguments named ``*_html`` are inserted as they are.
Nothing on the page refers to the network; images are embedded as data: URIs and files are linked relatively.
"""

from __future__ import annotations

import math
import os
import string
from html import escape
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import numpy as np

NBSP = "\u00a0"
THIN_SPACE = "\u2009"


def esc(value: object) -> str:
    """`value` as HTML text, quotes included (safe in element content and in attribute values)."""
    return escape(str(value), quote=True)


def number(value: float | int | bool | None, unit: str = "", digits: int = 3) -> str:
    """A number with its unit as escaped HTML: integers in full, floats to `digits` significant digits (whole
    numbers from 1000 up), booleans as yes/no, None as "–"."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):,}".replace(",", THIN_SPACE)
    elif not math.isfinite(value):
        text = "∞" if value > 0 else str(value)
    elif abs(value) >= 1000:
        text = f"{value:,.0f}".replace(",", THIN_SPACE)
    else:
        text = f"{value:.{digits}g}"
    return esc(f"{text}{NBSP}{unit}" if unit else text)


def duration(seconds: float | None) -> str:
    """A duration in s, min or h with its units, escaped; "–" when missing."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return number(seconds, "s")
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return esc(f"{minutes}{NBSP}min")
    return esc(f"{minutes // 60}{NBSP}h {minutes % 60:02d}{NBSP}min")


def table(rows: list[tuple], header: tuple | None = None, numeric_from: int = 1) -> str:
    """A table; cells are pre-escaped HTML (use :func:`esc`, :func:`number`); columns from `numeric_from` align
    right."""
    def cells(row: tuple, tag: str) -> str:
        return "".join(f'<{tag}{" class=num" if i >= numeric_from else ""}>{cell}</{tag}>'
                       for i, cell in enumerate(row))

    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>" if header else ""
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>'


def key_values(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (label text, value HTML); labels are escaped here."""
    return '<table class="kv"><tbody>' + "".join(
        f"<tr><th>{esc(label)}</th><td>{value_html}</td></tr>" for label, value_html in rows) + "</tbody></table>"


def figure(data_uri: str, alt: str, caption_html: str = "", wide: bool = False) -> str:
    """An embedded image with its caption; `data_uri` must be a data:image/png URI."""
    if not data_uri.startswith("data:image/png;base64,"):
        raise ValueError("report images must be embedded PNG data URIs")
    caption = f"<figcaption>{caption_html}</figcaption>" if caption_html else ""
    return f'<figure class="{"wide" if wide else ""}"><img src="{data_uri}" alt="{esc(alt)}">{caption}</figure>'


def unavailable(what: str, reasons: list[str] | None = None) -> str:
    """A note saying `what` is not available, and why."""
    why = "".join(f"<li>{esc(reason)}</li>" for reason in reasons or [])
    return f'<div class="note"><strong>{esc(what)}: not available.</strong>{f"<ul>{why}</ul>" if why else ""}</div>'


def note(text_html: str) -> str:
    """A muted paragraph of explanation."""
    return f'<p class="hint">{text_html}</p>'


def file_link(path: Path, report_dir: Path, text: str | None = None) -> str:
    """A link to `path`, relative to the report's folder (so the folder can be moved as a whole)."""
    relative = os.path.relpath(Path(path).resolve(), Path(report_dir).resolve())
    href = quote(Path(relative).as_posix(), safe="/")
    return f'<a href="{esc(href)}"><code>{esc(text or Path(relative).as_posix())}</code></a>'


def section(anchor: str, title: str, body_html: str) -> str:
    """A titled section of the page, reachable at #`anchor`."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body_html}</section>'


def card(label: str, value_html: str) -> str:
    """One figure of the at-a-glance strip at the top of the page."""
    return f'<div class="card"><div class="value">{value_html}</div><div class="label">{esc(label)}</div></div>'


def page(title: str, subtitle: str, cards_html: str, sections: list[tuple[str, str, str]], footer: str) -> str:
    """The complete page: `sections` are (anchor, title, body HTML); titles and texts are escaped here."""
    template = string.Template(resources.files("cryofire.report").joinpath("template.html").read_text("utf-8"))
    toc = "".join(f'<li><a href="#{esc(anchor)}">{esc(name)}</a></li>' for anchor, name, _ in sections)
    body = "".join(section(anchor, name, html) for anchor, name, html in sections)
    return template.substitute(title=esc(title), subtitle=esc(subtitle), cards=cards_html, toc=toc,
                               sections=body, footer=esc(footer))
