"""Markdown table and heatmap PNG (like the paper's figure 5) from bench/switch_matrix.py results.

python bench/matrix_report.py bench/results/switch_matrix_llama2-7b_h100x4.json [--png out.png]
    [--restarts restart_a.json restart_b.json]   (restarts measured by `switch_matrix.py --restart-only` runs)
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def committed(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c.get("state") == "committed" and c.get("median_total_s") is not None]


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def predicted(cell: dict) -> float:
    return cell.get("median_predicted_s", cell["runs"][-1].get("predicted", {}).get("total", float("nan")))


def table(results: dict) -> str:
    restarts = results.get("restarts", {})
    gib = 1e9
    lines = ["| source → target | switch (s) | restart (s) | restart / switch | predicted (s) | serving pause, "
             "client / server (s) | groups (s) | transform (s) | slowest transform steps (s) | live requests | "
             "KV blocks | weights stay / peer / host (GB) |", "|" + "---|" * 12]
    order = results.get("topologies") or list(dict.fromkeys(c["source"] for c in results["cells"]))
    rows = sorted(results["cells"], key=lambda c: (order.index(c["source"]), order.index(c["target"])))
    for c in rows:
        if c.get("state") != "committed":
            lines.append(f"| {c['source']} → {c['target']} | {c.get('state')}: {c.get('error')} |" + " |" * 10)
            continue
        run = c["runs"][-1]
        restart = restarts.get(c["target"])
        ratio = f"{restart / c['median_total_s']:.0f}×" if restart else "—"
        steps = sorted(run.get("transform_detail", {}).items(), key=lambda kv: -kv[1])[:3]
        b = run.get("bytes_by_source", {})
        lines.append(
            f"| {c['source']} → {c['target']} | {c['median_total_s']:.3f} | {seconds(restart)} | {ratio} | "
            f"{predicted(c):.3f} | {c['median_pause_s']:.3f} / {seconds(run.get('server_pause_s'))} | "
            f"{run['phases'].get('groups', 0):.3f} | {run['phases'].get('transform', 0):.3f} | "
            f"{', '.join(f'{k} {v:.3f}' for k, v in steps)} | {run.get('requests_live')} | "
            f"{run.get('kv_blocks_migrated')} | {b.get('weights_stay', 0) / gib:.2f} / "
            f"{b.get('weights_peer', 0) / gib:.2f} / {b.get('weights_host', 0) / gib:.2f} |")
    done = committed(results["cells"])
    if done:
        totals = [c["median_total_s"] for c in done]
        errors = [abs(predicted(c) - c["median_total_s"]) / c["median_total_s"] for c in done]
        ratios = [restarts[c["target"]] / c["median_total_s"] for c in done if restarts.get(c["target"])]
        lines.append("")
        lines.append(f"{len(done)} switches: median {statistics.median(totals):.3f} s (max {max(totals):.3f} s); "
                     f"{f'restart / switch min {min(ratios):.0f}×' if ratios else 'no restarts in this run'}; "
                     f"prediction error median "
                     f"{100 * statistics.median(errors):.0f} % (max {100 * max(errors):.0f} %)")
    return "\n".join(lines)


def heatmap(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys([c["source"] for c in results["cells"]] + [c["target"] for c in results["cells"]]))
    grid = [[float("nan")] * len(names) for _ in names]
    for c in committed(results["cells"]):
        grid[names.index(c["source"])][names.index(c["target"])] = c["median_total_s"]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.5))
    image = ax.imshow(grid, cmap="viridis_r")
    values = [v for row in grid for v in row if v == v]
    middle = (min(values) + max(values)) / 2 if values else 0.0
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN: a committed switch
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if value < middle else "white")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(f"{results['shape']}: live switch time (s), {len(names)} topologies")
    fig.colorbar(image, ax=ax, label="seconds")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--png")
    ap.add_argument("--restarts", nargs="*", default=[],
                    help="results of --restart-only runs, for the targets the matrix's own run did not restart into")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    restarts = results.setdefault("restarts", {})
    for path in args.restarts:
        for target, seconds in json.loads(Path(path).read_text())["restarts"].items():
            restarts.setdefault(target, seconds)
    print(table(results))
    if args.png:
        heatmap(results, Path(args.png))


if __name__ == "__main__":
    main()
