"""The GIL A/B's table (bench/gpu_session.sh gil_ab): per file and topology, TTFT p50/p99 and each request's ITL
(last token - first) / (tokens - 1) at p50/p90/p99, from the kept records."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rempd.policy.window import percentile  # noqa: E402


def main(paths: list[str]) -> None:
    print(f"{'run':<24}{'topology':<9}{'done':>6}{'failed':>7}{'ttft p50':>10}{'ttft p99':>10}"
          f"{'itl p50':>9}{'itl p90':>9}{'itl p99':>9}   (seconds; ms for itl)")
    for path in paths:
        for mode, summary in json.loads(Path(path).read_text())["modes"].items():
            ok = [r for r in summary["records"] if r["error"] is None]
            ttft, itl = [r["ttft"] for r in ok], [r["itl"] * 1e3 for r in ok]
            print(f"{Path(path).stem:<24}{mode:<9}{len(ok):>6}{len(summary['records']) - len(ok):>7}"
                  + "".join(_cell(percentile(ttft, q), 10, 3) for q in (0.5, 0.99))
                  + "".join(_cell(percentile(itl, q), 9, 1) for q in (0.5, 0.9, 0.99)))


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-' if value is None else f'{value:.{digits}f}':>{width}}"


if __name__ == "__main__":
    main(sys.argv[1:])
