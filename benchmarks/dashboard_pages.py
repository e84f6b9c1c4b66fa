"""Page times of the dashboard in a real browser: serve the app (`stabilitylab dashboard
LAB`), open each page in Debian's chromium (Playwright) and time, from the navigation,
the first chart drawn and the page settled (script done, every chart drawn):

- cold: a fresh server (empty caches) for each page, its first visit;
- warm: on that server and tab, another page opened from the sidebar, then this page
  again (a rerun with full caches, as when the user moves between pages): settled time.

Several repeats; the median and the spread (min–max) are printed. A benchmark, not a test:
it asserts nothing about time.

    .venv/bin/python benchmarks/dashboard_pages.py                # the reference lab, 3 repeats
    .venv/bin/python benchmarks/dashboard_pages.py --lab runs --repeats 5 --json times.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from dashboard_serve import chromium, navigate_and_time, open_and_time, serve  # noqa: E402

PAGES = {"Overview": "", "Runs": "runs", "Compare": "compare", "Loop dynamics": "loop", "Spectra": "spectra",
         "Scaling laws": "scaling", "Architecture": "architecture"}


def measure(lab: Path, pages: dict[str, str], repeats: int, shots: Path | None) -> dict[str, dict[str, list]]:
    times = {name: {"first": [], "settled": [], "warm": []} for name in pages}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, path in pages.items():
                with serve(lab, Path(tmp) / "streamlit.log") as url, chromium() as page:
                    cold = open_and_time(page, f"{url}/{path}")
                    if shots is not None and r == 0:
                        shots.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=shots / f"{name.lower().replace(' ', '-')}.png", full_page=True)
                    other = "Runs" if name != "Runs" else "Compare"
                    navigate_and_time(page, other)
                    warm = navigate_and_time(page, name)
                if cold["exception"]:
                    print(f"  {name}: the page shows an exception", file=sys.stderr)
                for key, value in (("first", cold["first"]), ("settled", cold["settled"]), ("warm", warm)):
                    times[name][key].append(round(value, 3))
                print(f"  repeat {r + 1} {name}: cold {cold['first']:.2f} / {cold['settled']:.2f} s, "
                      f"warm {warm:.2f} s", file=sys.stderr, flush=True)
    return times


def table(times: dict[str, dict[str, list]]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = ["| page | first chart, cold | settled, cold | settled, warm |", "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {cell(t['first'])} | {cell(t['settled'])} | {cell(t['warm'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", type=Path, default=REPO / "data" / "reference-lab")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pages", nargs="*", default=list(PAGES), help="page names (default: all)")
    parser.add_argument("--default-page", help="the page served at / (an older app opened on Runs)")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    parser.add_argument("--screenshots", type=Path, help="save each page's first cold view here")
    args = parser.parse_args()
    pages = {p: "" if p == args.default_page else PAGES[p] for p in args.pages}
    times = measure(args.lab, pages, args.repeats, args.screenshots)
    if args.json:
        args.json.write_text(json.dumps(times, indent=1) + "\n")
    print(f"seconds, median (min–max) of {args.repeats} repeats; lab {args.lab}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(table(times))


if __name__ == "__main__":
    main()
