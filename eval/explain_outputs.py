"""What `selfexplain explain` leaves for people: feature labels in Neuronpedia's explanation export format
and a static HTML browser of every explained unit (search, each unit's explanation, its validation where
it was sampled, and for SAE latents their top exemplars with activations highlighted).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Optional

from selfexplain.groundtruth.features.neuronpedia import FeatureLabel, write_neuronpedia

NEURONPEDIA = "neuronpedia.json"
BROWSER = "index.html"


def feature_labels(rows: list[dict], feature_of: Callable[[dict], tuple[int, int]], validation: dict) -> list[FeatureLabel]:
    """One label per latent row; a sampled latent carries its validation scores."""
    labels = []
    for row in rows:
        layer, index = feature_of(row)
        scored = validation.get("units", {}).get(row["unit"], {}).get("scores", {})
        scores = {name: float(scored[name]) for name in ("simulation", "judge") if name in scored}
        labels.append(FeatureLabel(layer, index, row["explanation"], scores))
    return labels


def write_feature_export(folder: Path, rows: list[dict], feature_of: Callable[[dict], tuple[int, int]],
                         validation: dict, model_id: str, sae_id: str, explainer: str) -> Path:
    return write_neuronpedia(folder / NEURONPEDIA, feature_labels(rows, feature_of, validation), model_id, sae_id,
                             f"selfexplain:{explainer}")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }}
.gold {{ color: #555; }} .trained {{ color: #999; }} mark {{ background: rgba(255, 140, 0, var(--a)); }}
#summary {{ white-space: pre-wrap; background: #f6f6f6; padding: 0.6em; }}
</style></head><body>
<h1>{title}</h1>
<pre id="summary">{summary}</pre>
<input id="search" type="search" placeholder="search units, explanations and gold labels" size="50">
<span id="count"></span>
<table><thead><tr><th>unit</th><th>asked about</th><th>explanation</th><th>validation</th></tr></thead>
<tbody id="units"></tbody></table>
<script id="data" type="application/json">{data}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const body = document.getElementById("units"), count = document.getElementById("count");
function esc(s) {{ const d = document.createElement("div"); d.textContent = String(s); return d.innerHTML; }}
function exemplar(w) {{
  const peak = Math.max(...w.acts, 1e-9);
  return w.tokens.map((t, i) => w.acts[i] > 0 ? `<mark style="--a:${{(w.acts[i] / peak).toFixed(2)}}">${{esc(t)}}</mark>` : esc(t)).join("");
}}
function row(u) {{
  const v = u.validation;
  const check = v ? `<span class="gold">gold: ${{esc(v.gold)}}</span><br>` +
    Object.entries(v.scores).map(([k, x]) => `${{k}} ${{typeof x === "number" && !Number.isInteger(x) ? x.toFixed(2) : x}}`).join(", ") +
    (v.exemplars || []).map(w => `<div>${{exemplar(w)}}</div>`).join("") : "";
  return `<tr data-unit="${{esc(u.unit)}}"><td>${{esc(u.unit)}}${{u.trained_on ? ' <span class="trained">(trained on)</span>' : ""}}</td>` +
    `<td>${{esc(u.where)}}</td><td>${{u.explanation ? esc(u.explanation) : '<i class="trained">(no answer)</i>'}}</td>` +
    `<td>${{check}}</td></tr>`;
}}
function show(query) {{
  const q = query.toLowerCase();
  const text = u => [u.unit, u.where, u.explanation, u.validation ? u.validation.gold : ""].join(" ").toLowerCase();
  const shown = data.filter(u => !q || text(u).includes(q));
  body.innerHTML = shown.map(row).join("");
  count.textContent = `${{shown.length}} of ${{data.length}} units`;
}}
const search = document.getElementById("search");
search.addEventListener("input", e => show(e.target.value));
// index.html#search=TEXT opens with that search (a link to a unit)
search.value = location.hash.startsWith("#search=") ? decodeURIComponent(location.hash.slice(8)) : "";
show(search.value);
</script></body></html>
"""


def _where(row: dict) -> str:
    """What the unit is, in a line: its layers and, where the question has one, the prompt and token."""
    parts = [f"layers {row['layers']}"] if row["layers"] else []
    if row["query"].get("token") is not None:
        parts.append(f"token {row['query']['token']!r}")
    if row["prompt"]:
        parts.append(row["prompt"])
    return "; ".join(parts)


def write_browser(path: Path, rows: list[dict], validation: dict, title: str, summary: list[str]) -> Path:
    units = validation.get("units", {})
    data = [{"unit": row["unit"], "where": _where(row), "explanation": row["explanation"],
             "trained_on": row["trained_on"], "validation": units.get(row["unit"])} for row in rows]
    # JSON inside <script>: '</' would end the element
    blob = json.dumps(data).replace("</", "<\\/")
    path.write_text(PAGE.format(title=html.escape(title), summary=html.escape("\n".join(summary)), data=blob))
    return path


CHROMIUM = "chromium-headless-shell"


def render_page(page: Path, search: Optional[str] = None, screenshot: Optional[Path] = None) -> tuple[str, list[str]]:
    """The page as headless Chromium leaves it after its scripts ran (opened at #search=TEXT when given):
    (the DOM, the console messages). screenshot: a PNG of the window as well."""
    import shutil
    import subprocess
    from urllib.parse import quote

    binary = shutil.which(CHROMIUM)
    if binary is None:
        raise FileNotFoundError(f"{CHROMIUM} is not installed: `make install` installs it (Debian package {CHROMIUM})")
    url = page.resolve().as_uri() + (f"#search={quote(search)}" if search is not None else "")
    base = [binary, "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--window-size=1280,900"]
    done = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    if screenshot is not None:
        subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def listed_units(dom: str) -> list[str]:
    """The units a rendered page lists, in order."""
    import re

    return [html.unescape(u) for u in re.findall(r'<tr data-unit="([^"$]*)"', dom)]


def browser_title(task: str, explainer: str, target: str, count: Optional[int] = None) -> str:
    return f"{explainer} explains {target}: {task}" + (f" ({count} units)" if count is not None else "")
