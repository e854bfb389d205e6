"""Human-readable results: report.md and a heatmap PNG per task, from matrix.json."""
from __future__ import annotations

from pathlib import Path

from selfexplain.groundtruth.layout import RunLayout
from selfexplain.groundtruth.tasks import task_spec

from .headline import appendix_lines, headline_lines, marked, test_sizes
from .matrix import data_efficiency, headline, lift_curves


def with_interval(cell: dict, metric: str, digits: int = 3, sep: str = " ") -> str:
    """A cell's metric and its bootstrap 95% interval where it has one; '-' where it has no value."""
    value = cell.get(metric)
    if value is None:
        return "-"
    lo, hi = cell.get(f"{metric}_lo"), cell.get(f"{metric}_hi")
    interval = f"{sep}[{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{value:.{digits}f}{interval}"


def heatmap(task: str, table: dict, path: Path, metric: str) -> Path:
    """Rows x targets heatmap of one metric with its 95% intervals; self cells outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, targets = list(table["rows"]), table["targets"]
    values = [[_number(table["rows"][r]["cells"].get(t, {}).get(metric)) for t in targets] for r in rows]
    fig, ax = plt.subplots(figsize=(3.0 + 1.8 * len(targets), 1.2 + 0.6 * len(rows)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), [f"target: {t}" for t in targets])
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(rows):
        for j, target in enumerate(targets):
            value = values[i][j]
            ax.text(j, i, with_interval(table["rows"][row]["cells"].get(target, {}), metric, 2, "\n"), ha="center",
                    va="center", fontsize=8, color="white" if value == value and value < 0.6 else "black")
            if table["rows"][row]["cells"].get(target, {}).get("self"):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_title(f"{task}: {metric} (red: self-explanation)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value) -> float:
    return float("nan") if value is None else value


def efficiency_plot(task: str, curves: dict, metric: str, path: Path) -> Path:
    """The data-efficiency curve: metric against train examples per layer, one line per explainer with 2+ sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, points in curves.items():
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("train examples per layer")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: data efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def random_target_lines(table: dict) -> list[str]:
    """Each explaining row on a trained target minus the same row on its random-weights twin (unpaired
    intervals): where a metric cannot tell them apart, it is not measuring the target's computation."""
    found = table.get("random_target", [])
    if not found:
        return []
    lines = ["### trained target minus its random-weights twin", "",
             "| row | target - random twin | metric | difference |", "|---|---|---|---|"]
    lines += [f"| {d['row']} | {d['target']} - {d['random_target']} | {d['metric']} | {marked(d)} |" for d in found]
    return lines + [""]


def lift_table(curves: dict) -> list[str]:
    """The data-efficiency curve of what counts: per explainer and metric, the trained row minus its best
    control at each training size, with its paired interval (bold: it excludes zero)."""
    if not curves:
        return []
    sizes = sorted({d["examples_per_layer"] for by in curves.values() for points in by.values() for d in points})
    lines = ["Trained minus its best control (that size's own v-controls, the base model's rows, baselines):", "",
             f"| explainer | metric | {' | '.join(f'{n} per layer' for n in sizes)} |", "|---|---|" + "---|" * len(sizes)]
    for name, by in curves.items():
        for metric, points in by.items():
            at = {d["examples_per_layer"]: d for d in points}
            lines.append(f"| {name} | {metric} | " + " | ".join(marked(at[n]) if n in at else "-" for n in sizes) + " |")
    return lines


def matrix_table(table: dict, metric: str) -> list[str]:
    """One task's matrix as Markdown table lines: a row per explainer or baseline, a column per target."""
    targets = table["targets"]
    lines = [f"| explainer | {' | '.join(targets)} |", "|---|" + "---|" * len(targets)]
    for name, row in table["rows"].items():
        cells = []
        for t in targets:
            cell = row["cells"].get(t)
            cells.append("-" if cell is None else with_interval(cell, metric) + (" (self)" if cell["self"] else ""))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def export_results(matrix: dict, task: str, explainer: str, target: str) -> list[str]:
    """An explainer export's model-card results: per table of its task (out-of-distribution sets too), the
    rows of this explainer (trained, its controls, untrained) and the baselines on its target, each metric
    with its interval; empty when the matrix has no cell of it."""
    lines = []
    for name, table in matrix["tasks"].items():
        if name.split(":")[0] != task.split(":")[0]:
            continue
        rows = {row_name: row["cells"][target] for row_name, row in table["rows"].items()
                if target in row["cells"] and (row["explainer"] == explainer or row["kind"] == "baseline")}
        if not any(table["rows"][r]["explainer"] == explainer for r in rows):
            continue
        metrics = table["metrics"]
        lines += [f"`{name}` on target `{target}` (95% bootstrap intervals; controls and baselines beside the trained row):",
                  "", f"| row | {' | '.join(metrics)} |", "|---|" + "---|" * len(metrics)]
        lines += [f"| {r} | {' | '.join(with_interval(cell, m) for m in metrics)} |" for r, cell in rows.items()]
        lines.append("")
    return lines


def label_lines(task: str, by_target: dict) -> list[str]:
    """The labels' statistics per target: the task's own account of them where its spec gives one
    (label_stats_lines), else per split the counts every per-item task's finalize writes."""
    own = task_spec(task).label_stats_lines
    lines = []
    for target, stats in by_target.items():
        lines += [f"### labels of target {target}", "", *(own(stats) if own else _split_lines(stats)), ""]
    return lines


def _split_lines(stats: dict) -> list[str]:
    lines = []
    for split, s in stats.items():
        if not s.get("count"):
            continue
        rules = ", ".join(f"{k} {v:.2f}" for k, v in s.get("trivial_rules", {}).items()) or "none"
        top = ", ".join(f"{o!r} x{c}" for o, c in s["top_outputs_after"][:5])
        lines += [f"- {split}: {s['count']} records, changed rate {s['changed_rate']:.2f}, majority "
                  f"{s['majority_rate']:.2f}; accuracy of predicting 'changed' from one field alone: "
                  f"{rules}; top outputs after the intervention: {top}"
                  + (f"; largest balancing cell {s['largest_cell_share']:.2f}" if "cells" in s else "")
                  + (_screen_text(s["screen"]) if s.get("screen") else "")
                  + (f"; {s['unanswered']} unanswered (dropped)" if s.get("unanswered") else "")
                  + (f"; {s['near_ties']} near-ties (logit margin < {s['near_tie_margin']})" if s.get("near_ties") else "")]
    return lines


def _screen_text(screen: dict) -> str:
    """What an attribution-patching screen patched and the recall of changed labels its audit implies."""
    recall = (f", recall of changed labels {screen['recall']:.2f} [{screen['recall_lo']:.2f}, {screen['recall_hi']:.2f}]"
              f" by an audit of {screen['audited']}") if "recall" in screen else ", no audit"
    return f"; AtP screen: {screen['patched_fraction']:.0%} of {screen['sites']} sites patched exactly{recall}"


def distinct_outputs_line(table: dict) -> str:
    """How many different explanations each row gave, per target (1: the row ignores its input)."""
    parts = [f"{name}: " + "/".join(str(c.get("distinct_outputs", "-")) for c in row["cells"].values())
             for name, row in table["rows"].items() if row["kind"] != "baseline"]
    return "Distinct outputs per row (per target, in column order): " + "; ".join(parts)


def write_report(layout: RunLayout, matrix: dict, config_name: str) -> Path:
    """report.md with the headline differences, per-task metric tables, heatmaps and label statistics."""
    lines = [f"# selfexplain report: {config_name}", "",
             "Rows are explainers (trained on the column's target, untrained, or a baseline); columns are",
             "target models. A self cell is an explainer explaining the model it is a copy of.", "",
             *headline_lines(matrix, layout)]
    for task, table in matrix["tasks"].items():
        png = heatmap(task, table, layout.figure("heatmap", task), headline(table))
        lines += [f"## {task}", "", f"![{task} heatmap]({png.name})", ""]
        for metric in table["metrics"]:
            lines += [f"### {metric}", "", *matrix_table(table, metric), ""]
        curves = data_efficiency(table)
        if curves:
            plot = efficiency_plot(task, curves, headline(table), layout.figure("efficiency", task))
            lines += ["### data efficiency", "", f"![data efficiency]({plot.name})", ""]
            lines += [f"- {name}: " + ", ".join(f"{n} per layer -> {v:.3f}" for n, v in points) for name, points in curves.items()]
            lines += ["", *lift_table(lift_curves(table)), ""]
        lines += random_target_lines(table)
        lines += ["Test records per target: " + ", ".join(f"{t}: {k}" for t, k in test_sizes(table).items()), "",
                  distinct_outputs_line(table), ""]
        for pair, keys in table.get("projection_fit_error", {}).items():
            errors = "; ".join(f"layers {k}: {e['fit']:.3f} fit / {e.get('heldout', float('nan')):.3f} held out"
                               for k, e in sorted(keys.items(), key=lambda item: int(item[0].split("-")[0])))
            lines += [f"- lstsq projection {pair}, relative error ||h_E - Pi h_M|| / ||h_E||: {errors}"]
        if table.get("projection_fit_error"):
            lines.append("")
        lines += label_lines(task, table.get("label_stats", {}))
    lines += appendix_lines(matrix)
    path = layout.report
    path.write_text("\n".join(lines) + "\n")
    return path
