"""``report.html``: one self-contained page (pictures embedded) describing a run."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from ..errors import RunError
from ..files import write_text_atomic
from ..run.rundir import CONFIG, PICTURES, check_run_dir, read_history, read_summary

SEARCH_TRIALS = "trials.json"  # written by mnistlab.lab.search
_CAPTIONS = {
    "example.png": "First training example",
    "loss.png": "Loss and validation accuracy per epoch",
    "predictions.png": "Validation images 0-8: predicted / true",
    "confusion.png": "Confusion matrix",
    "mistakes.png": "Most confident mistakes",
}

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.k{text-align:left}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}"""


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: dict) -> str:
    body = "".join(f"<tr><td class='k'>{html.escape(str(k))}</td><td class='k'>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in d.items())
    return f"<table>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def render_report(run_dir: str | os.PathLike) -> str:
    run_dir = check_run_dir(run_dir)
    summary = read_summary(run_dir)
    history = read_history(run_dir)
    config = json.loads((run_dir / CONFIG).read_text())
    figures = []
    for name in PICTURES:
        path = run_dir / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            figures.append(f"<figure><img alt='{_CAPTIONS[name]}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{_CAPTIONS[name]}</figcaption></figure>")
    title = f"mnistlab run {run_dir.name}: {summary['model']}, {100 * summary['valid_acc']:.2f}% valid accuracy"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Summary</h2>{_kv(summary)}<h2>Config</h2>{_kv(config)}"
            f"<h2>Per-epoch metrics</h2>{_table(history.epochs)}"
            f"<h2>Pictures</h2>{''.join(figures)}</body></html>\n")


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_search_report(out: str | os.PathLike) -> str:
    """A search folder's page: its trials (from ``trials.json``), the best config and the pictures."""
    out = Path(out)
    try:
        result = json.loads((out / SEARCH_TRIALS).read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{out / SEARCH_TRIALS}: unreadable search results ({exc})") from None
    rows = [{"trial": r["number"], "state": r["state"],
             "valid_acc": "-" if r["valid_acc"] is None else f"{100 * r['valid_acc']:.2f}%",
             "epochs": r["epochs"], "run_dir": r["run_dir"], **r["params"]} for r in result["trials"]]
    best = result.get("best")
    title = f"mnistlab search {out.name}: {len(rows)} trials" + (
        f", best {100 * best['valid_acc']:.2f}% (trial {best['number']})" if best else "")
    figures = [_figure(out / name, caption) for name, caption in
               (("history.png", "Each trial's validation accuracy, and the best so far"),
                ("importances.png", "How much each setting mattered")) if (out / name).is_file()]
    best_config = _kv(json.loads((out / "best.json").read_text())) if (out / "best.json").is_file() else "<p>none</p>"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Trials</h2>{_table(rows)}<h2>Best config (best.json)</h2>{best_config}"
            f"<h2>Pictures</h2>{''.join(figures)}</body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of a run directory, or of a search's folder (default ``DIR/report.html``);
    returns its path."""
    folder = Path(run_dir)
    out = Path(out) if out is not None else folder / "report.html"
    if (folder / SEARCH_TRIALS).is_file() and not (folder / CONFIG).is_file():
        write_text_atomic(out, render_search_report(folder))
    else:
        write_text_atomic(out, render_report(run_dir))
    return out
