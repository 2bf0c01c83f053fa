"""A report's blocks written out: as Markdown beside its PNGs, and as one self-contained HTML file.

The HTML file carries its figures inside it (base64 PNG ``data:`` addresses) and refers to
nothing outside it, so it can be mailed or attached to a CI run as it is. Every text in it
is escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from sw_hooks.outputs.report_sections import Block, FigureBlock, Heading, Paragraph
from sw_hooks.outputs.tables import Code

STYLE = (
    "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}"
    "th,td{border:1px solid #ccc;padding:.25rem .5rem}td.n{text-align:right}"
    "figure{margin:1.5rem 0}img{max-width:100%}figcaption{color:#555;font-size:.9rem}"
)


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as Markdown; figures refer to the PNG files beside it."""
    return "\n\n".join(_markdown(block) for block in blocks) + "\n"


def _markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"# {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, FigureBlock):
        return f"![{block.name.rsplit('.', 1)[0]}]({block.name})\n\n{block.caption}"
    rule = ["---:" if numeric else "---" for numeric in block.numeric]
    lines = [_markdown_row(block.header), _markdown_row(rule)]
    lines += [_markdown_row([_markdown_cell(cell) for cell in row]) for row in block.rows]
    return "\n".join(lines)


def _markdown_cell(cell: str) -> str:
    text = cell.replace("|", "\\|")
    return f"`{text}`" if isinstance(cell, Code) else text


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_html(blocks: Sequence[Block], images: Mapping[str, bytes]) -> str:
    """The blocks as one HTML page, each figure's PNG bytes (``images[name]``) inside it.

    A figure whose bytes are not in ``images`` is left out, caption and all.
    """
    title = next((b.text for b in blocks if isinstance(b, Heading)), "Super-weight report")
    body = "\n".join(_html(block, images) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_escaped(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _escaped(text: str) -> str:
    return html.escape(str(text), quote=True)


def _html(block: Block, images: Mapping[str, bytes]) -> str:
    if isinstance(block, Heading):
        return f"<h1>{_escaped(block.text)}</h1>"
    if isinstance(block, Paragraph):
        return f"<p>{_escaped(block.text)}</p>"
    if isinstance(block, FigureBlock):
        return _html_figure(block, images)
    header = "".join(f"<th>{_escaped(cell)}</th>" for cell in block.header)
    rows = "\n".join(
        "<tr>"
        + "".join(_html_cell(c, n) for c, n in zip(row, block.numeric, strict=True))
        + "</tr>"
        for row in block.rows
    )
    return f"<table>\n<tr>{header}</tr>\n{rows}\n</table>"


def _html_cell(cell: str, numeric: bool) -> str:
    text = f"<code>{_escaped(cell)}</code>" if isinstance(cell, Code) else _escaped(cell)
    return f'<td class="n">{text}</td>' if numeric else f"<td>{text}</td>"


def _html_figure(block: FigureBlock, images: Mapping[str, bytes]) -> str:
    if block.name not in images:
        return ""
    encoded = base64.b64encode(images[block.name]).decode("ascii")
    alt = _escaped(block.name.rsplit(".", 1)[0])
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{_escaped(block.caption)}</figcaption></figure>"
    )
