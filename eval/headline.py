"""The report's headline: per matrix task, one table (a row per trained explainer, target and compared
metric: it minus its best control, and the self-explainer minus each cross-explainer, each with its
paired 95% interval, the significant ones in bold) and a figure of the same. The one-line reading of each
comparison goes to the report's appendix."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from selfexplain.groundtruth.layout import RunLayout

from .rows import ROW_KINDS

SMOKE_SCALE = 100
"""Below this many test records per cell, the report says its matrix demonstrates the machinery."""


def test_sizes(table: dict) -> dict[str, int]:
    """Test records (features) per target of a task table."""
    return {t: next((r["cells"][t]["n"] for r in table["rows"].values() if t in r["cells"]), 0) for t in table["targets"]}


def significant(d: dict) -> bool:
    """Whether a difference's interval excludes zero."""
    return d["lo"] > 0 or d["hi"] < 0


def marked(d: dict) -> str:
    """A difference with its interval, in bold where the interval excludes zero."""
    text = f"{d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    return f"**{text}**" if significant(d) else text


def _entry(d: dict) -> str:
    where = f", {d['n']} records" if ", " in d["comparison"] else ""  # a subset: how many it kept
    where += f" where {d['other']} differs" if "other" in d else ""
    return marked(d) + f" vs {d['second']}{where}"


def headline_table(task: str, table: dict) -> list[str]:
    """One task's comparisons as a Markdown table; no lines when it has none."""
    diffs = table.get("differences", [])
    if not diffs:
        return []
    comparisons = list(dict.fromkeys(d["comparison"] for d in diffs))
    rows: dict[tuple, dict[str, list[str]]] = {}
    for d in diffs:
        rows.setdefault((d["first"], d["target"], d["metric"]), {}).setdefault(d["comparison"], []).append(_entry(d))
    lines = [f"| explainer | target | metric | {' | '.join(comparisons)} |", "|---|---|---|" + "---|" * len(comparisons)]
    for (first, target, metric), by in rows.items():
        lines.append(f"| {first} | {target} | {metric} | " + " | ".join("<br>".join(by.get(c, ["-"])) for c in comparisons)
                     + " |")
    return lines


def agreement_lines(table: dict) -> list[str]:
    """How many test records the self vs cross split puts on each side, per target and cross model."""
    counts = [f"target {target} vs {other} as a target: {c['agree']} agree, {c['disagree']} disagree"
              + (f", {c['unmatched']} without the item" if c["unmatched"] else "")
              for target, others in table.get("agreement", {}).items() for other, c in others.items()]
    if not counts:
        return []
    return ["Agree / disagree: whether the cross-explainer's model, as a target, labels the same item alike "
            "(where both answer alike, either model can explain by simulating itself): " + "; ".join(counts) + ".", ""]


def headline_figure(task: str, table: dict, path: Path) -> Optional[Path]:
    """The task's comparisons as intervals around zero (filled: significant); None when it has none."""
    diffs = table.get("differences", [])
    if not diffs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.0, 1.0 + 0.35 * len(diffs)))
    colours = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(d["comparison"] for d in diffs))}
    for y, d in enumerate(reversed(diffs)):
        colour = colours[d["comparison"]]
        ax.errorbar(d["difference"], y, xerr=[[d["difference"] - d["lo"]], [d["hi"] - d["difference"]]], fmt="o",
                    color=colour, mfc=colour if significant(d) else "white", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(diffs)), [f"{d['first']} - {d['second']} ({d['target']}, {d['metric']})" for d in reversed(diffs)],
                  fontsize=7)
    for comparison, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=comparison)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{task}: paired differences, 95% intervals\n(filled: the interval excludes 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline_lines(matrix: dict, layout: Optional[RunLayout] = None) -> list[str]:
    """The report's opening: per task the table of paired differences (and, given the run folder, its
    figure), explainers that gave one output for everything, and what the sizes allow."""
    lines = ["## Headline", "", "Each trained explainer minus its best control (the control row or baseline that "
             "scores best), and the self-explainer minus each cross-explainer, on the same test records; "
             "paired bootstrap 95% intervals, in bold where they exclude zero. In words: the appendix.", ""]
    smallest = min((n for table in matrix["tasks"].values() for n in test_sizes(table).values()), default=0)
    if smallest < SMOKE_SCALE:
        lines += [f"As few as {smallest} test records (features) per cell: differences of about 0.1 cannot be told "
                  "from zero here. At smoke scale (the quickstart) the matrix demonstrates the machinery, not a "
                  "finding; docs/RESULTS.md holds the study (configs/study_cpu.yaml) and what it shows.", ""]
    for task, table in matrix["tasks"].items():
        rows = headline_table(task, table)
        if rows:
            lines += [f"### {task}", "", *rows, "", *agreement_lines(table)]
            png = headline_figure(task, table, layout.figure("headline", task)) if layout is not None else None
            lines += [f"![{task} headline]({png.name})", ""] if png else []
        failed = [f"{name} on {t}" for name, row in table["rows"].items() for t, c in row["cells"].items()
                  if c.get("distinct_outputs") == 1 and c.get("n", 0) > 1 and _explains(row["kind"])]
        if failed:
            lines += [f"- {task}: one output for every test record (a failed explainer): {', '.join(failed)}", ""]
    return lines


def appendix_lines(matrix: dict) -> list[str]:
    """Every comparison of the headline as a sentence a reader can quote."""
    lines = ["## Appendix: every comparison in words", ""]
    for task, table in matrix["tasks"].items():
        lines += [f"- {task}, target {d['target']} ({d['comparison']}): {d['reading']}" for d in table.get("differences", [])]
    return lines + [""]


def _explains(kind: str) -> bool:
    """A trained explainer's own row (not a control, not a baseline): one output for all is its failure."""
    return kind in ROW_KINDS and not ROW_KINDS[kind].control
