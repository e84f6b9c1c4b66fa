"""The reproduction's claims C1–C7 (experiments/REPORT.md, whose numbers report.py makes
from the reference lab): the summary table as rows, and for each claim the page and
selection of the dashboard that shows it. Shown on the Overview of the reference lab only:
the report describes exactly that lab."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "experiments" / "REPORT.md"

# claim -> (page, link label, query parameters); "{pair}" is the lab's headline pair
SHOWN_BY = {
    "C1": ("compare", "Compare: c1 grid", {"experiment": "c1_stability_grid"}),
    "C2": ("spectra", "Spectra: the pair", {"runs": "{pair}"}),
    "C3": ("compare", "Compare: c3", {"experiment": "c3_depth_sampling"}),
    "C4": ("compare", "Compare: c4", {"experiment": "c4_prelude_norm"}),
    "C5": ("scaling", "Scaling: L(T), c5", {"law": "test-time (exp)", "experiment": "c5_test_time_depth"}),
    "C6": ("scaling", "Scaling: unified, c6", {"law": "unified", "experiment": "c6_isoflop"}),
    "C7": ("compare", "Compare: c7", {"experiment": "c7_zoh"}),
    "(new)": ("spectra", "Spectra: the loop", {"runs": "{pair}"}),
}


@dataclass
class Claim:
    claim: str
    paper: str
    here: str
    verdict: str
    page: str | None = None
    label: str = ""
    params: dict | None = None


def read(report: Path = REPORT) -> list[Claim]:
    """The rows of the report's summary table (| claim | paper | here | verdict |), with the
    page that shows each. No report: no claims."""
    if not report.is_file():
        return []
    claims = []
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (cells[0].startswith("C") and cells[0][1:].isdigit() or cells[0] == "(new)"):
            page, label, params = SHOWN_BY.get(cells[0], (None, "", None))
            claims.append(Claim(*cells, page=page, label=label, params=params))
    return claims


def links_for(claim: Claim, experiments: list[str], pair: tuple[str, str] | None) -> dict | None:
    """The claim's query parameters in this lab, or None when the lab lacks what it needs."""
    if claim.page is None:
        return None
    params = {}
    for key, value in claim.params.items():
        if value == "{pair}":
            if pair is None:
                return None
            value = ",".join(pair)
        if key == "experiment" and value not in experiments:
            return None
        params[key] = value
    return params
