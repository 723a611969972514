"""A summary across benchmarks and models: every runs/eval/MODEL/BENCHMARK/metrics.json under the given
folders, each benchmark's headline metric, as a Markdown table, a JSON object and a bar chart PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_path, atomic_write_text

# the number each benchmark is reported by (as in the LLaVA papers' tables)
HEADLINES = {"vqav2": ("accuracy",), "textvqa": ("accuracy",), "vizwiz": ("accuracy",), "gqa": ("accuracy",),
             "scienceqa": ("img_accuracy",), "pope": ("f1_mean",), "mme": ("perception",),
             "mmbench": ("circular_accuracy",), "seed": ("accuracy",), "llava_bench": ("scores", "all", "relative"),
             "mmvet": ("total",), "shapes": ("short", "accuracy")}
PERCENT = {"vqav2", "textvqa", "vizwiz", "gqa", "scienceqa", "pope", "mmbench", "seed", "shapes"}


def headline(benchmark: str, metrics: dict) -> float | None:
    value = metrics
    for key in HEADLINES.get(benchmark, ("accuracy",)):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) * (100 if benchmark in PERCENT else 1)


def collect(roots: list[str | Path]) -> dict[str, dict[str, float]]:
    """{model: {benchmark: headline}} from MODEL/BENCHMARK/metrics.json files under the roots."""
    table: dict[str, dict[str, float]] = {}
    for root in roots:
        files = sorted(Path(root).glob("**/metrics.json"))
        if not files:
            raise DataError(f"{root}: no metrics.json (run llava eval with --output runs/eval/MODEL/BENCHMARK)")
        for path in files:
            benchmark, model = path.parent.name, path.parent.parent.name
            value = headline(benchmark, json.loads(path.read_text()))
            if value is not None:
                table.setdefault(model, {})[benchmark] = value
    return table


def write_summary(table: dict[str, dict[str, float]], output: str | Path) -> dict[str, Path]:
    """summary.md, summary.json and summary.png in output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    benchmarks = sorted({b for row in table.values() for b in row})
    models = sorted(table)
    lines = ["| model | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
    for model in models:
        cells = [f"{table[model][b]:.1f}" if b in table[model] else "–" for b in benchmarks]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    atomic_write_text(output / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(output / "summary.json", json.dumps(table, indent=2, sort_keys=True) + "\n")
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(benchmarks) * max(1, len(models)) / 2 + 2), 4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(benchmarks))]
        axes.bar(xs, [table[model].get(b, 0.0) for b in benchmarks], width, label=model)
    axes.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(benchmarks))], benchmarks, rotation=30)
    axes.set_ylabel("score (headline metric)")
    axes.legend()
    figure.tight_layout()
    with atomic_path(output / "summary.png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return {name: output / f"summary.{name}" for name in ("md", "json", "png")}
