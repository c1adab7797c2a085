"""The evaluation report as one HTML page: its Markdown rendered, its figures inline.

A browser shows `report.md` as raw text, and a page opened from a blob (as the
web page must when the API needs a token) cannot fetch the figures beside it.
So the figures go into the page as `data:` URIs: the page is one self-contained
document, readable without JavaScript and without further requests.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

from models.store import REPORT_FILES, REPORT_MARKDOWN

MARKDOWN_LINK = f"report/{REPORT_MARKDOWN}"  # relative to /model/report
COMMENT = re.compile(r"<!--.*?-->\s*", re.DOTALL)  # the report's provenance note, for readers of the file
STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2rem auto; padding: 0 1rem; color: #1d1d1f; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; display: block; margin: 1rem 0; }
code { background: #f3f3f3; padding: 0 0.2rem; }
.source { font-size: 13px; color: #555; }
"""


def _renderer() -> MarkdownIt:
    # CommonMark plus tables (the report's metrics are tables); raw HTML is escaped, never passed on.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline_figures(markdown_html: str, folder: Path) -> str:
    """Replace each `src="figure.png"` of a report figure with its bytes as a data URI."""
    for name, media_type in REPORT_FILES.items():
        path = folder / name
        if media_type != "image/png" or not path.is_file():
            continue
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        markdown_html = markdown_html.replace(f'src="{name}"', f'src="data:{media_type};base64,{encoded}"')
    return markdown_html


def report_page(folder: Path, model_tag: str) -> str:
    """The HTML page of the report stored in `folder` (the model's store entry)."""
    body = _inline_figures(_renderer().render(COMMENT.sub("", (folder / REPORT_MARKDOWN).read_text())), folder)
    title = html.escape(f"Evaluation report: {model_tag}")
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<style>{STYLE}</style></head><body>\n"
        f'<p class="source">Model <code>{html.escape(model_tag)}</code>. '
        f'The same report as Markdown: <a href="{MARKDOWN_LINK}">{REPORT_MARKDOWN}</a>.</p>\n'
        f"{body}</body></html>\n"
    )
