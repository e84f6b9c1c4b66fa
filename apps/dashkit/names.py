"""Every name the dashboard reads from a run, in one place.

The trainer names its scalars; the dashboard relies only on the ones below and falls back
gracefully (a note, no chart) when a run did not record one. Users can plot any other
recorded scalar by picking it on the Compare page.
"""

from stabilitylab import records

# role -> scalar name as the trainer logs it
SCALARS = {
    "loss": records.LOSS,
    "grad_norm": records.GRAD_NORM,
    "state_norm": records.STATE_NORM,  # max ‖h_T‖ over the batch
    "tokens": records.TOKENS,  # cumulative training tokens
    "flops": records.FLOPS,  # cumulative training FLOPs
}

# per-iteration loop statistics (LoopTrace fields); the first is the default view
TRACES = records.TRACE_FIELDS

# spectra columns and their labels: ρ(Ā), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂, ‖e‖
SPECTRA = dict(zip(records.SPECTRUM_FIELDS, ("ρ(Ā)", "‖Ā‖₂", "‖B̄‖₂", "‖C‖₂", "‖e‖")))
RHO = records.RHO

# analysis arrays written by `stabilitylab analyze` and the analysis probe
ANALYSIS = {"jacobian_radius": records.JACOBIAN_RADIUS, "lyapunov": records.LYAPUNOV}

# `stabilitylab exit`: the report document (ExitReport.to_dict, read as plain JSON) and the
# per-checkpoint median |predicted − measured| exit depth, one value per ε
EXIT_RESULT = records.EXIT_RESULT
EXIT_PRED_ERROR = records.EXIT_PRED_ERROR

# evaluation metric of the test-time depth curve
VAL_LOSS = records.VAL_LOSS

# event kind -> (legend label, plotly marker symbol); other kinds draw as OTHER_EVENT
EVENTS = {
    records.SPIKE: ("loss spike", "triangle-up"),
    records.DIVERGENCE: ("divergence", "x"),
    records.EARLY_WARNING: ("early warning", "diamond"),
}
OTHER_EVENT = ("event", "circle-open")

# role -> config path (list_runs flattens it to "config.<dotted.path>")
CONFIG = {
    "injection": "model.injection",
    "lr": "train.lr",
    "mu_rec": "model.mean_recurrence",
    "mu_bwd": "model.backprop_depth",
    "d_model": "model.d_model",
    "d_state": "model.d_state",
    "n_prelude": "model.n_prelude",
    "n_core": "model.n_core",
    "n_coda": "model.n_coda",
    "prelude_norm": "model.prelude_norm",
    "vocab_size": "model.vocab_size",
    "eval_depths": "train.eval_depths",
}


PREFIX = records.CONFIG_PREFIX  # list_runs' config columns: PREFIX + "model.injection"


def field_name(column: str) -> str:
    """A config column as the user reads it: "config.model.injection" -> "model.injection"."""
    return column.removeprefix(PREFIX)


def config_column(role: str) -> str:
    """The list_runs column of a config role: "injection" -> "config.model.injection"."""
    return f"{PREFIX}{CONFIG[role]}"


def config_value(config: dict, role: str, default=None):
    """A run's config value by role, walking the nested dict; `default` when absent."""
    node = config
    for key in CONFIG[role].split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node
