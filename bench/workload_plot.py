"""PNG of a workload run: per phase, TTFT p99, ITL p99, output tokens/s and SLO attainment of every mode."""
from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install matplotlib (or pip install -e '.[test]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    phases = [p["name"] for p in results["schedule"]]
    panels = [("ttft_p99", "TTFT p99 (s)"), ("itl_p99", "ITL p99 (s)"), ("output_tokens_per_s", "output tokens/s"),
              ("slo_attainment", "SLO attainment")]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    width = 0.8 / max(1, len(modes))
    for ax, (key, title) in zip(axes, panels):
        for i, mode in enumerate(modes):
            values = [results["modes"][mode]["phases"][name][key] or 0.0 for name in phases]
            ax.bar([x + i * width for x in range(len(phases))], values, width, label=mode)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(phases))], phases)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    rate = axes[4]
    for p in results["schedule"]:
        rate.plot([p["start"], p["start"] + p["seconds"]], [p["rate_from"], p["rate_to"]], color="black")
    for s in (results["modes"].get("auto") or {}).get("switches", []):
        rate.axvline(s["at_s"], color="red", alpha=0.6)
        rate.text(s["at_s"], results["peak_rate"] * 0.95, str(s["target"]).split(" ")[0], rotation=90, fontsize=7)
    rate.set_title("offered rate (req/s) and auto's switches")
    rate.set_xlabel("seconds")
    fig.suptitle(f"SLO: TTFT ≤ {results['slo']['ttft']} s, ITL ≤ {results['slo']['itl']} s; peak {results['peak_rate']:.2f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
