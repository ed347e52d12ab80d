"""A document of blocks (headings, paragraphs, tables, images, raw markdown) rendered both to
markdown and to a simple HTML page (only ``**bold**`` and ```code``` are interpreted inline)."""

from __future__ import annotations

import html


class Doc:
    """Blocks rendered both to markdown and to HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, header, rows):
        self.blocks.append(("table", header, rows))

    def img(self, path, alt):
        self.blocks.append(("img", path, alt))

    def raw_md(self, text):
        self.blocks.append(("raw", text))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "|".join("---" for _ in b[1]) + "|")
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            else:
                out.append(b[1].rstrip())
            out.append("")
        return "\n".join(out)

    def html(self, title) -> str:
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
               "font-size:12px}td,th{border:1px solid #bbb;padding:3px 6px}img{max-width:100%}</style>"
               "</head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
                out.append("</table>")
            elif b[0] == "img":
                out.append(f"<p><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'></p>")
            else:
                out.append(f"<pre>{html.escape(b[1])}</pre>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """HTML-escaped ``text`` with ``**bold**`` and ```code``` spans."""
    t = html.escape(text)
    parts = t.split("**")
    t = "".join(f"<b>{s}</b>" if i % 2 else s for i, s in enumerate(parts))
    parts = t.split("`")
    return "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(parts))
