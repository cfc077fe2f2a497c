"""A tiny builder for self-contained HTML pages (inline CSS, images as base64 data URIs, no external assets)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #7a4b00; background: #fff6e0; padding: 0.4em 0.8em; border-left: 3px solid #e0a000; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def image(png: bytes, alt: str) -> str:
    """An ``<img>`` whose source is the PNG itself, a base64 data URI (no file next to the page)."""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{escape(alt)}">'


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] | None = None) -> str:
    """An HTML table; cells are escaped; ``numeric[j]`` right-aligns column ``j``."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(str(c))}</td>' if numeric[j] else f"<td>{escape(str(c))}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def paragraph(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>"


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{escape(text)}</h{level}>"


def page(title: str, body_parts: Iterable[str]) -> str:
    """A complete HTML5 document with inline CSS."""
    body = "\n".join(body_parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
