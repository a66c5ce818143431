"""What every report figure shares: a headless matplotlib, atomic PNG/HTML writes."""

from __future__ import annotations

import html
from pathlib import Path

from scprint.io import atomic_path, write_text

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend: report jobs run on nodes without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """PNG written to a temporary sibling and renamed into place."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def no_data_figure(path: str | Path, title: str, message: str) -> None:
    """A figure that says what is missing, so the report item still exists (and says why)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.4, message, ha="center", va="center", wrap=True)
    save_figure(fig, path)


# Click a column header to sort by it (again: reverse); numbers sort as numbers.
SORT_SCRIPT = (
    "document.querySelectorAll('th').forEach((th,i)=>{th.style.cursor='pointer';"
    "th.onclick=()=>{const b=th.closest('table').tBodies[0],r=[...b.rows],"
    "k=x=>{const t=x.cells[i]?x.cells[i].textContent:'',n=parseFloat(t.replace(/,/g,''));"
    "return isNaN(n)?t:n},d=th.dataset.d=th.dataset.d==='1'?'-1':'1';"
    "r.sort((a,c)=>{const p=k(a),q=k(c);return (typeof p===typeof q?(p>q)-(p<q)"
    ":typeof p==='number'?-1:1)*d});r.forEach(x=>b.appendChild(x))}})"
)


def write_table(path: str | Path, frame, title: str, table_id: str) -> None:
    """A self-contained HTML page holding one table, sortable by a click on a column's
    header (one inline script, no external resources), so a run of 1,500 datasets can be
    read by its worst rows."""
    body = frame.to_html(index=False, table_id=table_id, border=0, na_rep="", escape=True)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head>"
        f"<body><h3>{html.escape(title)}</h3>{body}<script>{SORT_SCRIPT}</script></body></html>\n"
    )
    write_text(path, page)


def short_label(text: str, width: int = 28) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"
