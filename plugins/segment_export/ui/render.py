"""HTML and SVG of the Segment exports pages, rendered on the server (Jinja2, which Airflow itself depends on,
with autoescaping: every value from a spec, a summary or a destination's message is escaped). No JavaScript and
nothing from a CDN: the pages work in the UI's sandboxed iframe and with scripts off.

Links inside the pages are relative (the app may sit under a base URL); links to Airflow's own pages (the run,
the task log) open in the top window (``target="_top"``), out of the UI's iframe.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import DictLoader, Environment, select_autoescape
from markupsafe import Markup

from segment_export.ui.views import (
    CHART_FIELDS,
    COUNT_FIELDS,
    ExportRow,
    chart_bars,
    format_count,
    format_duration,
    format_when,
    rejection_alert,
)

COLOURS = {"accepted": "#2e7d32", "rejected": "#c62828", "skipped": "#9e9e9e", "removed": "#ef6c00"}

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}Segment exports{% endblock %}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 20px;color:#1a202c;background:#fff}
 h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px} .muted{color:#718096}
 table{border-collapse:collapse;width:100%;margin:6px 0} th,td{padding:6px 8px;border-bottom:1px solid #e2e8f0;text-align:left;vertical-align:top}
 th{font-weight:600;color:#4a5568;background:#f7fafc} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
 a{color:#2b6cb0;text-decoration:none} a:hover{text-decoration:underline}
 .state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;background:#718096}
 .state-success{background:#2e7d32}.state-failed{background:#c62828}.state-running,.state-queued{background:#2b6cb0}
 .dry{display:inline-block;padding:1px 6px;border-radius:10px;font-size:11px;background:#fefcbf;color:#744210;margin-left:4px}
 .alert{color:#c62828;font-size:12px} .rejected{color:#c62828;font-weight:600}
 .legend span{display:inline-block;margin-right:12px;font-size:12px} .legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px}
 form.search{margin:8px 0} form.search input,form.search select,form.search button{font:inherit;padding:4px 8px}
 pre{background:#f7fafc;border:1px solid #e2e8f0;padding:8px;overflow:auto;max-height:360px;font-size:12px}
 .cards{display:flex;flex-wrap:wrap;gap:8px} .card{border:1px solid #e2e8f0;border-radius:6px;padding:6px 12px;min-width:90px}
 .card b{display:block;font-size:18px} code{font-size:12px}
</style></head><body>{% block body %}{% endblock %}</body></html>
"""

_LIST = """{% extends "base" %}{% block body %}
<h1>Segment exports</h1>
<p class="muted">Every export you may see: its last run and counts (from the run's summary, as in its task log), and
the last runs' counts. Click a run for its outcomes.</p>
<div class="legend">{% for name in chart_fields %}<span><i style="background:{{ colours[name] }}"></i>{{ name }}</span>{% endfor %}</div>
{% if not rows %}<p>No export visible to you{% if spec_errors %} ({{ spec_errors }} spec error(s): see the DAG import errors){% endif %}.</p>{% else %}
<table id="exports">
<thead><tr><th>Export</th><th>Destination and target</th><th>Schedule</th><th>Last run</th>
{% for name in count_fields %}<th class="num">{{ name }}</th>{% endfor %}<th>Last runs</th></tr></thead>
<tbody>
{% for row in rows %}{% set last = row.last %}{% set counted = row.counts_run %}
<tr data-export-id="{{ row.export.export_id }}">
 <td><b>{{ row.export.name }}</b><br><code>{{ row.export.export_id }}</code>{% if row.export.paused %} <span class="muted">(paused)</span>{% endif %}</td>
 <td>{{ row.export.destination }}<br><span class="muted">{{ row.export.target }}</span></td>
 <td>{{ row.export.schedule }}</td>
 <td>{% if last %}<a href="{{ run_href(row.export.export_id, last.run_id) }}" class="run-link" data-run-id="{{ last.run_id }}">
   <span class="state state-{{ last.state }}">{{ last.state }}</span></a>{% if last.dry_run %}<span class="dry">dry run</span>{% endif %}
   <br><span class="muted">{{ when(last.start) }} · {{ duration(last.duration_s) }}</span>
   {% if counted and counted.run_id != last.run_id %}<br><span class="muted">counts of {{ counted.run_id }}</span>{% endif %}
 {% else %}<span class="muted">never run</span>{% endif %}</td>
 {% for name in count_fields %}{% set value = row.last_counts[name] %}
 <td class="num count-{{ name }}{% if name == 'rejected' and value %} rejected{% endif %}" data-count="{{ name }}">{{ count(value) }}</td>{% endfor %}
 <td>{{ chart(row) }}{% set alert = alert_of(row) %}{% if alert %}<br><span class="alert">{{ alert }}</span>{% endif %}</td>
</tr>{% endfor %}
</tbody></table>{% endif %}
{% endblock %}"""

_RUN = """{% extends "base" %}{% block title %}{{ export.name }}: {{ run.run_id }}{% endblock %}{% block body %}
{% if show_back %}<p><a href="{{ back_href }}">← Segment exports</a></p>{% endif %}
<h1>{{ export.name }} <span class="muted" style="font-size:14px">{{ export.export_id }}</span></h1>
<p><span class="state state-{{ run.state }}">{{ run.state }}</span>{% if run.dry_run %}<span class="dry">dry run</span>{% endif %}
 run <code>{{ run.run_id }}</code> · {{ when(run.start) }} · {{ duration(run.duration_s) }} ·
 {{ export.destination }} {{ export.target }} ·
 <a target="_top" href="{{ airflow_run_href }}" id="airflow-run">Airflow run</a> ·
 <a target="_top" href="{{ task_log_href }}" id="task-log">task log</a></p>

<h2>Summary</h2>
{% if summary %}<div class="cards" id="summary">
{% for name, value in summary_cards %}<div class="card" data-count="{{ name }}"><b>{{ value }}</b>{{ name }}</div>{% endfor %}</div>
{% else %}<p class="muted">This run returned no summary (its task did not finish; see its task log).</p>{% endif %}

{% if run.dry_run and summary %}<h2>Plan (dry run: nothing was sent)</h2>
<table id="plan"><tbody>{% for label, value in plan_rows %}<tr><td>{{ label }}</td><td class="num">{{ value }}</td></tr>{% endfor %}</tbody></table>
{% if summary.examples %}<p class="muted">Example payloads (values masked):</p>{% for example in summary.examples %}<pre>{{ pretty(example) }}</pre>{% endfor %}{% endif %}
{% endif %}

<h2>Outcomes</h2>
{% if unavailable %}<p class="muted" id="outcomes-unavailable">Outcomes cannot be read: {{ unavailable }}</p>{% else %}
<table id="by-action" style="width:auto"><thead><tr><th>action</th><th class="num">profiles</th></tr></thead><tbody>
{% for action, n in counts.by_action.items() %}<tr><td><a href="{{ filter_href(action=action) }}">{{ action }}</a></td><td class="num">{{ count(n) }}</td></tr>
{% else %}<tr><td colspan="2" class="muted">no outcome rows for this run</td></tr>{% endfor %}</tbody></table>
{% if counts.by_reason %}<h2>Reasons</h2><table id="by-reason"><thead><tr><th>action</th><th>reason (the destination's message)</th><th class="num">profiles</th></tr></thead><tbody>
{% for action, reason, n in counts.by_reason %}<tr><td>{{ action }}</td><td>{{ reason }}</td><td class="num">{{ count(n) }}</td></tr>{% endfor %}</tbody></table>{% endif %}

<h2>Rows</h2>
<form class="search" method="get" action="">
 <input type="search" name="q" value="{{ query }}" placeholder="{{ 'reason, action or key' if can_edit else 'reason or action' }}" aria-label="Search rows">
 <select name="action" aria-label="Action"><option value="">any action</option>
 {% for action in counts.by_action %}<option value="{{ action }}"{% if action == selected_action %} selected{% endif %}>{{ action }}</option>{% endfor %}</select>
 <button type="submit">Search</button></form>
<p class="muted">{{ count(total) }} row(s){% if query or selected_action %} match{% endif %}. Profile keys are masked{% if can_edit %}; "show" reveals one (you may edit this DAG){% endif %}.</p>
<table id="rows"><thead><tr><th class="num">#</th><th>profile key</th><th>action</th><th>reason</th></tr></thead><tbody>
{% for row in rows %}<tr data-action="{{ row.action }}"><td class="num">{{ row.n }}</td>
 <td>{% if revealed and revealed[0] == row.n %}<code class="revealed">{{ revealed[1] }}</code>{% else %}<code>{{ row.key }}</code>{% if can_edit %} <a href="{{ filter_href(reveal=row.n) }}" class="reveal">show</a>{% endif %}{% endif %}</td>
 <td>{{ row.action }}</td><td>{{ row.reason or "" }}</td></tr>{% endfor %}</tbody></table>
<p>{% if prev_href %}<a href="{{ prev_href }}">← previous</a> {% endif %}{% if next_href %}<a href="{{ next_href }}">next →</a>{% endif %}</p>
{% endif %}

{% for section in sections %}<h2>{{ section.title }}</h2>{% if section.note %}<p class="muted">{{ section.note }}</p>{% endif %}
<table class="section">{% for cells in section.rows %}{% set header_row = section.header and loop.first %}<tr>{% for cell in cells %}{% if header_row %}<th>{{ cell }}</th>{% else %}<td>{{ cell }}</td>{% endif %}{% endfor %}</tr>{% endfor %}</table>{% endfor %}
{% endblock %}"""

_MESSAGE = """{% extends "base" %}{% block title %}{{ title }}{% endblock %}{% block body %}
<h1>{{ title }}</h1><p id="message">{{ message }}</p><p><a href="{{ back_href }}">Segment exports</a></p>{% endblock %}"""

_env = Environment(loader=DictLoader({"base": _BASE, "list": _LIST, "run": _RUN, "message": _MESSAGE}), autoescape=select_autoescape(default=True))


def run_path(export_id: str, run_id: str) -> str:
    """The run page's path under the app, with both ids quoted (run ids hold ``:`` and ``+``)."""
    return f"dags/{quote(export_id, safe='')}/runs/{quote(run_id, safe='')}"


def chart_svg(row: ExportRow, *, link_prefix: str = "", width: int = 180, height: int = 36) -> Markup:
    """The last runs' counts as stacked bars (oldest left), each a link to its run and with a tooltip; a failed
    run is a red tick at the base, a dry run a hollow bar."""
    bars = chart_bars(row.runs)
    if not bars:
        return Markup('<span class="muted">no runs</span>')
    tallest = max((sum(b.counts.values()) for b in bars), default=0) or 1
    slot = width / max(len(bars), 10)
    parts = [f'<svg class="chart" role="img" aria-label="counts of the last {len(bars)} runs" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for i, bar in enumerate(bars):
        x = i * slot + 1
        w = max(slot - 2, 1)
        tip = f"{bar.run_id}: " + ", ".join(f"{name} {bar.counts[name]:,}" for name in CHART_FIELDS)
        if bar.dry_run:
            tip += " (dry run)"
        href = link_prefix + run_path(row.export.export_id, bar.run_id)
        parts.append(f'<a href="{_attr(href)}"><title>{_attr(tip)}</title>')
        y = float(height)
        for name in CHART_FIELDS:
            value = bar.counts[name]
            if not value:
                continue
            h = max(value / tallest * (height - 2), 1.0)
            y -= h
            fill = "none" if bar.dry_run else COLOURS[name]
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}" '
                         f'stroke="{COLOURS[name]}" stroke-width="{1 if bar.dry_run else 0}"/>')
        if bar.failed:
            parts.append(f'<rect x="{x:.1f}" y="{height - 3}" width="{w:.1f}" height="3" fill="#c62828"/>')
        # an invisible full-height target, so that an empty bar is clickable too
        parts.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="transparent"/></a>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _attr(value: str) -> str:
    return str(Markup.escape(value))


def _helpers() -> dict[str, Any]:
    return {"count": format_count, "duration": format_duration, "when": format_when,
            "pretty": lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)}


def render_message(title: str, message: str, *, back_href: str) -> str:
    return _env.get_template("message").render(title=title, message=message, back_href=back_href)


def render_list(rows: list[ExportRow], *, spec_errors: int = 0) -> str:
    return _env.get_template("list").render(
        rows=rows, count_fields=COUNT_FIELDS, chart_fields=CHART_FIELDS, colours=COLOURS, spec_errors=spec_errors,
        run_href=run_path, chart=chart_svg, alert_of=lambda row: rejection_alert(row.runs), **_helpers(),
    )


SUMMARY_FIELDS = ("read", "segment_rows", "invalid", "duplicates", "skipped_by_limit", "sent", "accepted", "created", "updated",
                  "rejected", "skipped", "unchanged", "removed", "held_back", "subscribed", "pending",
                  "tags_added", "tags_removed", "batches")


def summary_cards(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not summary:
        return []
    cards = [(name, format_count(summary.get(name))) for name in SUMMARY_FIELDS if summary.get(name) is not None]
    if summary.get("seconds") is not None:
        cards.append(("seconds", f"{float(summary['seconds']):.1f}"))
    return cards


def plan_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """A dry run's plan, from its summary: what the run would have done."""
    rows = [("would send (new and changed profiles)", summary.get("planned")), ("unchanged (not sent)", summary.get("unchanged")),
            ("would remove (left the segment)", summary.get("removed")), ("removals the guard would hold back", summary.get("held_back")),
            ("tags to add / remove", f"{summary.get('tags_added', 0)} / {summary.get('tags_removed', 0)}"),
            ("invalid rows (never sent)", summary.get("invalid")), ("skipped by the limit", summary.get("skipped_by_limit"))]
    return [(label, value if isinstance(value, str) else format_count(value)) for label, value in rows]


def render_run(**context: Any) -> str:
    summary = context.get("summary")
    query, action, offset, limit, total = (context.get("query", ""), context.get("selected_action", ""),
                                           context.get("offset", 0), context.get("limit", 100), context.get("total", 0))

    def filter_href(**changes: Any) -> str:
        params = {"q": query, "action": action, "offset": offset}
        if "action" in changes:
            params.update(action=changes["action"], offset=0, q="")
        if "offset" in changes:
            params["offset"] = changes["offset"]
        if "reveal" in changes:
            params["reveal"] = changes["reveal"]
        return "?" + urlencode({k: v for k, v in params.items() if v not in ("", None, 0)})

    context.setdefault("sections", [])
    return _env.get_template("run").render(
        summary_cards=summary_cards(summary), plan_rows=plan_rows(summary) if summary else [],
        filter_href=filter_href,
        prev_href=filter_href(offset=max(offset - limit, 0)) if offset > 0 else None,
        next_href=filter_href(offset=offset + limit) if offset + limit < total else None,
        **_helpers(), **context,
    )
