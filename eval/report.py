"""The run's report, `<run>/report/index.html`: every metric against images seen, the FID-vs-sigma_rel curve of the
newest sweep, the latest sample grids and a table of every result with its settings.

    key = write(store, "demo")      # rebuilt by the evaluation service after each result

The page is one file that opens offline and as a static S3 object: no script, no stylesheet, font or image from
anywhere else. The plots are matplotlib figures (a well-kept library the evaluation's dependencies already pull in)
saved as SVG with the text drawn as paths, so they need no font and sit inline in the HTML; sample grids are
inlined as base64 data: URIs. Figures are built with matplotlib.figure.Figure, not pyplot, so no global backend or
figure registry is touched. Every string from a result is escaped: a result is data, never markup.
"""
from __future__ import annotations

import base64
import io
import json
import re
from datetime import datetime, timezone
from html import escape

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from trainer.store import Store

GRIDS = 4  # sample grids shown, newest first
# Kinds plotted against images seen, with the heading of their plot; their metric names label the curves.
FAMILIES = {"fid": "Fréchet distances", "is": "Inception scores", "bpd": "Likelihood bound"}
SETTINGS = ("sampler", "steps", "guidance", "ema", "fid_mode")
_NUMBER = (int, float)

STYLE = """
body { font-family: 'DejaVu Sans', 'Liberation Sans', Arial, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } .meta { color: #555; margin-top: 0; }
.plots, .grids { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; width: calc(50% - 8px); } figure svg { width: 100%; height: auto; }
.grids figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-weight: bold; margin-bottom: 4px; word-break: break-word; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { border: 1px solid #ccc; padding: 2px 5px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; } td.num, td.nowrap { white-space: nowrap; }
td.wrap { overflow-wrap: break-word; max-width: 320px; } td.wrap span { white-space: nowrap; }
.results { overflow-x: auto; } .bad { color: #b00; } .empty { color: #555; font-style: italic; }
"""


def _problem(result) -> str | None:
    """Why a parsed result cannot be shown, or None; the page lists it as unreadable instead of failing."""
    if not isinstance(result, dict):
        return "not a JSON object"
    need = {"step": int, "metric": str, "kind": str, "status": str}
    if result.get("status") == "ok" and result.get("kind") in FAMILIES:
        need |= {"images_seen": int, "value": _NUMBER}
    for field, kind in need.items():
        if not isinstance(result.get(field), kind):
            return f"field '{field}' is missing or not a {getattr(kind, '__name__', 'number')}"
    if result["status"] == "ok" and result["kind"] == "fid_sweep":
        curve = result.get("curve")
        points = [*curve, result.get("best")] if isinstance(curve, list) else [None]
        if not all(isinstance(p, dict) and all(isinstance(p.get(k), _NUMBER) for k in ("sigma_rel", "value"))
                   for p in points):
            return "fid_sweep result needs 'curve' and 'best' made of {sigma_rel, value} numbers"
    return None


def load_results(store: Store, run: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """The run's results, newest step first, and the (key, reason) of each result JSON that cannot be read."""
    results, unreadable = [], []
    for key in store.list(f"{run}/evals/"):
        if not key.endswith(".json"):
            continue  # leases and anything else
        try:
            result = json.loads(store.get(key))
        except (ValueError, UnicodeDecodeError) as e:
            unreadable.append((key, f"not valid JSON: {e}"))
            continue
        reason = _problem(result)
        if reason:
            unreadable.append((key, reason))
        else:
            results.append(result)
    results.sort(key=lambda r: (-r["step"], r["metric"]))
    return results, unreadable


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an inline <svg> element whose text is paths (no fonts needed). Its clip and marker ids derive
    from `salt`: one salt per figure keeps them unique in the page, and the page the same for the same results."""
    out = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt}):
        fig.savefig(out, format="svg", metadata={"Date": None})
    svg = out.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: neither belongs inside HTML


def _family_plot(results: list[dict], kind: str) -> str | None:
    """One curve per metric name of `kind` against images seen, stderr as error bars; None when nothing is ok."""
    ok = [r for r in results if r["kind"] == kind and r["status"] == "ok"]
    if not ok:
        return None
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for name in sorted({r["metric"] for r in ok}):
        points = sorted((r for r in ok if r["metric"] == name), key=lambda r: r["images_seen"])
        unit = points[-1].get("unit") or ""
        labels.append(f"{name} ({unit})" if unit else name)
        stderr = [r["stderr"] if isinstance(r.get("stderr"), _NUMBER) else 0.0 for r in points]
        ax.errorbar([r["images_seen"] for r in points], [r["value"] for r in points],
                    yerr=stderr if any(stderr) else None, marker="o", capsize=3, label=labels[-1])
    ax.set_xlabel("images seen")
    ax.set_ylabel("\n".join(labels))
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return f"<figure><figcaption>{FAMILIES[kind]}: {escape(', '.join(labels))}</figcaption>{_svg(fig, kind)}</figure>"


def _sweep_plot(results: list[dict]) -> str | None:
    """The newest fid_sweep result's metric against sigma_rel, its best point marked; None without one."""
    sweeps = [r for r in results if r["kind"] == "fid_sweep" and r["status"] == "ok"]
    if not sweeps:
        return None
    newest = max(sweeps, key=lambda r: (r["step"], str(r.get("time", ""))))
    curve = sorted(newest["curve"], key=lambda p: p["sigma_rel"])
    best, name = newest["best"], newest["metric"]
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([p["sigma_rel"] for p in curve], [p["value"] for p in curve], marker="o", label=name)
    ax.plot([best["sigma_rel"]], [best["value"]], marker="*", markersize=16, color="tab:red", linestyle="none",
            label=f"best: sigma_rel {best['sigma_rel']:.3g}, {best['value']:.4g}")
    ax.set_xlabel("sigma_rel (post-hoc power EMA width)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    caption = f"{name} against sigma_rel at step {newest['step']}"
    return f"<figure><figcaption>{escape(caption)}</figcaption>{_svg(fig, 'fid_sweep')}</figure>"


def _grids(store: Store, run: str) -> str:
    """The newest sample grids of the trainer, inlined."""
    prefix = f"{run}/samples/"
    grids = [(int(m[1]), key) for key in store.list(prefix) if (m := re.fullmatch(r"(\d+)\.png", key[len(prefix):]))]
    if not grids:
        return '<p class="empty">No sample grids yet.</p>'
    figures = []
    for step, key in sorted(grids, reverse=True)[:GRIDS]:
        data = base64.b64encode(store.get(key)).decode("ascii")
        figures.append(f'<figure><figcaption>step {step}</figcaption>'
                       f'<img alt="samples at step {step}" src="data:image/png;base64,{data}"></figure>')
    return f'<div class="grids">{"".join(figures)}</div>'


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else escape(str(value))


def _row(r: dict) -> str:
    settings = r.get("settings") if isinstance(r.get("settings"), dict) else {}
    reference = r.get("reference") if isinstance(r.get("reference"), dict) else {}
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
    warnings = r.get("warnings") if isinstance(r.get("warnings"), list) else []
    shown = " ".join(f"<span>{escape(k)}={_cell(settings[k])}</span>" for k in SETTINGS if k in settings)
    cells = [
        f'<td class="num">{_cell(r["step"])}</td>', f'<td class="num">{_cell(r.get("images_seen"))}</td>',
        f"<td>{_cell(r['metric'])}</td>",
        f'<td class="num">{_cell(r.get("value"))} {_cell(r.get("unit") or "")}</td>',
        f'<td class="num">{_cell(r.get("stderr"))}</td>', f'<td class="num">{_cell(r.get("n"))}</td>',
        f'<td class="wrap{"" if r["status"] == "ok" else " bad"}">{_cell(status)}</td>',
        f'<td class="wrap">{shown}</td>',
        f'<td title="{_cell(reference.get("path"))}">{_cell(reference.get("id"))}</td>',
        f'<td class="wrap">{"<br>".join(_cell(w) for w in warnings)}</td>',
        f'<td class="nowrap">{_cell(r.get("worker"))}</td>', f'<td class="nowrap">{_cell(r.get("time"))}</td>',
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _table(results: list[dict], unreadable: list[tuple[str, str]]) -> str:
    if not results and not unreadable:
        return '<p class="empty">No evaluation results yet.</p>'
    head = "".join(f"<th>{h}</th>" for h in ("step", "images seen", "metric", "value", "stderr", "n", "status",
                                             "settings", "reference", "warnings", "worker", "time"))
    html = f'<div class="results"><table><tr>{head}</tr>{"".join(_row(r) for r in results)}</table></div>'
    if unreadable:
        items = "".join(f"<li><code>{escape(key)}</code>: {escape(reason)}</li>" for key, reason in unreadable)
        html += f'<h3 class="bad">Unreadable results</h3><ul>{items}</ul>'
    return html


def build(store: Store, run: str) -> str:
    """The report page of `run` in `store`, as HTML."""
    results, unreadable = load_results(store, run)
    plots = [p for p in [*(_family_plot(results, kind) for kind in FAMILIES), _sweep_plot(results)] if p]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    count = f"{len(results)} results" + (f", {len(unreadable)} unreadable" if unreadable else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(run)}: evaluation report</title>
<style>{STYLE}</style></head><body>
<h1>{escape(run)}</h1>
<p class="meta">store {escape(store.uri)} &middot; generated {generated} &middot; {count}</p>
<h2>Metrics</h2>
{f'<div class="plots">{"".join(plots)}</div>' if plots else '<p class="empty">No completed results to plot yet.</p>'}
<h2>Samples</h2>
{_grids(store, run)}
<h2>Results</h2>
{_table(results, unreadable)}
</body></html>
"""


def write(store: Store, run: str) -> str:
    """Rebuild the report of `run` and store it (atomically) at `<run>/report/index.html`; returns the key."""
    key = f"{run}/report/index.html"
    store.put(key, build(store, run).encode("utf-8"))
    return key
