"""The lab's story from its runs table (apps/dashkit/story.py), the claims read from the
report, and which experiments a law can be fitted to: pure functions on small tables."""

import numpy as np
import pandas as pd
from dashboard_lab import REPO  # noqa: F401  (puts apps/ on sys.path)

from dashkit import claims, fits, story

INJ, LR, SEED = "config.model.injection", "config.train.lr", "config.train.seed"


def table(rows: list[dict]) -> pd.DataFrame:
    """A runs table as store.list_runs makes it, with only the columns the story reads."""
    out = []
    for i, r in enumerate(rows):
        out.append({"run_id": r.get("run_id", f"run{i}"), "experiment": r.get("experiment", "grid"),
                    "sweep_cell": f"injection={r['inj']},lr={r['lr']},seed={r['seed']}", "seed": r["seed"],
                    "status": r.get("status", "finished"), "status_step": r.get("step", 100),
                    "final_loss": r.get("loss", 2.0), "max_rho": r.get("rho", 0.5),
                    "max_state_norm": r.get("h", 10.0), INJ: r["inj"], LR: r["lr"], SEED: r["seed"],
                    "config.model.d_model": 64})
    return pd.DataFrame(out)


def test_pairs_match_every_field_but_the_injection_seed_included():
    runs = table([{"run_id": "c0", "inj": "concat", "lr": 0.01, "seed": 0},
                  {"run_id": "c1", "inj": "concat", "lr": 0.01, "seed": 1},
                  {"run_id": "p0", "inj": "parcae", "lr": 0.01, "seed": 0},
                  {"run_id": "p2", "inj": "parcae", "lr": 0.02, "seed": 0}])  # another LR: no twin
    (pairs,) = story.matched_pairs(runs, "grid")
    assert (pairs.left_value, pairs.right_value) == ("concat", "parcae")  # unconstrained left
    assert pairs.frame[["left", "right"]].values.tolist() == [["c0", "p0"]]
    assert story.grid_fields(runs) == [INJ, LR]  # in the sweep cell's order, the seed left out


def test_a_seed_outside_the_config_still_tells_runs_apart():
    runs = table([{"run_id": f"{inj}{s}", "inj": inj, "lr": 0.01, "seed": s} for inj in ("concat", "parcae")
                  for s in (0, 1)]).drop(columns=SEED)
    (pairs,) = story.matched_pairs(runs, "grid")
    assert pairs.frame.values.tolist() == [["seed=0", "concat0", "parcae0"], ["seed=1", "concat1", "parcae1"]]


def test_every_unconstrained_injection_is_paired_with_every_constrained_one():
    rows = [{"inj": inj, "lr": 0.01, "seed": 0} for inj in ("add", "concat", "parcae", "parcae-zoh")]
    pairs = story.matched_pairs(table(rows), "grid")
    assert [(p.left_value, p.right_value) for p in pairs] == [
        ("add", "parcae"), ("add", "parcae-zoh"), ("concat", "parcae"), ("concat", "parcae-zoh")]


def test_injections_of_one_kind_pair_in_order_and_a_two_valued_field_is_a_contrast():
    zoh = story.matched_pairs(table([{"inj": "parcae", "lr": 0.01, "seed": 0},
                                     {"inj": "parcae-zoh", "lr": 0.01, "seed": 0}]), "grid")
    assert [(p.left_value, p.right_value) for p in zoh] == [("parcae", "parcae-zoh")]
    lrs = story.matched_pairs(table([{"inj": "parcae", "lr": 0.01, "seed": 0},
                                     {"inj": "parcae", "lr": 0.02, "seed": 0}]), "grid")
    assert lrs[0].field == LR and (lrs[0].left_value, lrs[0].right_value) == ("0.01", "0.02")


def test_the_headline_pair_is_an_unconstrained_divergence_with_rho_above_one_beside_a_survivor():
    runs = table([{"run_id": "a0", "inj": "add", "lr": 0.02, "seed": 0, "status": "diverged", "rho": 1.0},
                  {"run_id": "p0", "inj": "parcae", "lr": 0.02, "seed": 0},
                  {"run_id": "c1", "inj": "concat", "lr": 0.04, "seed": 0, "status": "diverged", "rho": 3.6},
                  {"run_id": "p1", "inj": "parcae", "lr": 0.04, "seed": 0},
                  {"run_id": "a1", "inj": "add", "lr": 0.04, "seed": 0}])
    assert story.first_pair(runs) == ("c1", "p1")
    assert story.first_pair(runs[runs["run_id"].isin(["a0", "p0"])]) == ("a0", "p0")
    assert story.first_pair(runs.iloc[[1]]) is None  # one run: no pair


def test_verdicts_name_who_diverged_or_who_ended_lower():
    row = lambda **kw: pd.Series({"status": "finished", "status_step": 200, "final_loss": 2.0, "max_rho": 0.5, **kw})
    assert story.verdict(row(status="diverged", status_step=15, max_rho=3.6), row(), "concat", "parcae") == \
        "concat diverged @ 15, ρ(Ā) 3.6; parcae finished"
    assert story.verdict(row(final_loss=2.2, max_rho=1.02), row(), "free", "parcae") == \
        "both finished; parcae lower loss by 0.2; free reached ρ(Ā) ≥ 1"
    assert story.verdict(row(status="diverged", status_step=9), row(status="diverged", status_step=30), "a", "b") \
        == "both diverged (a @ 9, b @ 30)"


def test_outcome_map_counts_each_cells_seeds_by_their_worst_outcome():
    runs = table([{"run_id": "c0", "inj": "concat", "lr": 0.01, "seed": 0, "status": "diverged"},
                  {"run_id": "c1", "inj": "concat", "lr": 0.01, "seed": 1},
                  {"run_id": "p0", "inj": "parcae", "lr": 0.01, "seed": 0},
                  {"run_id": "p1", "inj": "parcae", "lr": 0.01, "seed": 1},
                  {"run_id": "p2", "inj": "parcae", "lr": 0.02, "seed": 0}])
    extras = pd.DataFrame({"spikes": [0, 0, 2, 0, 0], "lambda1": np.nan}, index=runs["run_id"])
    cells = story.outcome_grid(runs, extras, "grid").set_index(["row", "col"])
    outcome = ["finished", "spiked", "diverged", "n", "worst"]
    assert cells.loc[("concat", "0.01"), outcome].tolist() == [1, 0, 1, 2, 2]
    assert cells.loc[("parcae", "0.01"), outcome].tolist() == [1, 1, 0, 2, 1]
    assert cells.loc[("parcae", "0.02"), outcome].tolist() == [1, 0, 0, 1, 0]
    assert cells.attrs["fields"] == ["injection", "lr"]


def test_the_report_gives_seven_claims_each_shown_by_a_page():
    rows = claims.read()
    assert [c.claim for c in rows] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "(new)"]
    assert all(c.page and c.verdict for c in rows)
    c5 = next(c for c in rows if c.claim == "C5")
    assert claims.links_for(c5, ["c5_test_time_depth"], None) == {"law": "test-time (exp)",
                                                                   "experiment": "c5_test_time_depth"}
    assert claims.links_for(c5, ["c1_stability_grid"], None) is None  # the lab lacks the experiment


def test_a_law_is_offered_the_experiment_with_the_data_it_needs_and_told_why_not_the_others():
    def runs_of(experiment, mus, steps):
        return [{"run_id": f"{experiment}/{m}-{s}", "experiment": experiment, "status": "finished", "last_step": s,
                 "config.model.mean_recurrence": m, "config.train.steps": s,
                 "config.train.eval_depths": depths} for m in mus for s in steps]
    depths = [1, 2, 4, "mu", "2mu"]
    runs = pd.DataFrame(runs_of("grid", [8], [200]) * 3 + runs_of("depth", [4, 8, 12], [500])
                        + runs_of("isoflop", [1, 2, 4], [100, 200, 400]))
    runs.loc[runs["experiment"] == "depth", "config.train.eval_depths"] = pd.Series(
        [list(range(1, 37))] * 3, index=runs.index[runs["experiment"] == "depth"])
    test_time = fits.fittable(runs, fits.TEST_TIME).set_index("experiment")
    assert fits.best_experiment(test_time.reset_index()) == "depth"  # 36 depths beat 5
    unified = fits.fittable(runs, "unified").set_index("experiment")
    assert fits.best_experiment(unified.reset_index()) == "isoflop"
    assert "one model size" in unified.at["grid", "why not"] and "D does not vary" in unified.at["depth", "why not"]
