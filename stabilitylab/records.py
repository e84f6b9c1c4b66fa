"""Every name a run records, in one list: what the trainer and `analyze` write, and what the
store's summary, events, bounds, the report and the dashboard read.

A name is written here once; everything else imports it. Renaming one is a schema change
(old runs keep the old name), so names only ever get added. This module imports nothing,
so the store (which imports nothing else of stabilitylab) can read it too.
"""

# ---- per-step scalars ----------------------------------------------------------------------
LOSS = "loss"  # training loss, nats per token (mean over the global batch)
LR = "lr"  # the learning rate of the step (peak × schedule factor)
GRAD_NORM = "grad_norm"  # ‖∇‖₂ of all parameters before clipping
GRAD_NORM_ROLE = "grad_norm/{role}"  # ‖∇‖₂ of one parameter role (train/optim.py ROLES)
TOKENS_PER_S = "tokens_per_s"  # training throughput of the step
TOKENS = "tokens"  # cumulative training tokens
FLOPS = "flops"  # cumulative training FLOPs (config/sizes.py, at the depths sampled)
WALL_TIME = "wall_time"  # cumulative training seconds
DEPTH_N_MEAN = "depth_n_mean"  # mean no-gradient iterations n over the batch
DEPTH_K_MEAN = "depth_k_mean"  # mean gradient iterations k over the batch
DEPTH_TOTAL_MAX = "depth_total_max"  # the longest n + k of the batch
STATE_NORM = "h_T_norm"  # max per-token ‖h_T‖ over the batch: the divergence rule's state norm
STATE_NORM_MEAN = "h_T_norm_mean"  # mean per-token ‖h_T‖

RADIUS_ESTIMATE = "jacobian_radius_est"  # every-step ρ(∂F/∂h) at h_T by the warm-started tracker (monitor)
CONTRACTION_RATE = "contraction_rate"  # every-step q from the training forward's own loop trace (monitor)
MONITOR_SCALARS = (RADIUS_ESTIMATE, CONTRACTION_RATE)  # what LoopMonitor adds to SCALARS

SCALARS = (LOSS, LR, GRAD_NORM, TOKENS_PER_S, TOKENS, FLOPS, WALL_TIME, DEPTH_N_MEAN, DEPTH_K_MEAN,
           DEPTH_TOTAL_MAX, STATE_NORM, STATE_NORM_MEAN)  # plus GRAD_NORM_ROLE per role

# ---- the loop trace (`RunWriter.log_trace`): per iteration t = 1..T, then two per probe ------
TRACE_STATE_NORM_MEAN = "state_norm_mean"  # mean ‖h_t‖
TRACE_STATE_NORM_MAX = "state_norm_max"  # max ‖h_t‖
TRACE_DELTA_NORM_MEAN = "delta_norm_mean"  # mean ‖h_t − h_{t−1}‖
TRACE_REL_RESIDUAL = "rel_residual"  # mean ‖h_t − h_{t−1}‖ / ‖h_t‖
TRACE_COSINE = "cosine"  # mean cos(h_t, h_{t−1})
TRACE_FIELDS = (TRACE_STATE_NORM_MEAN, TRACE_STATE_NORM_MAX, TRACE_DELTA_NORM_MEAN, TRACE_REL_RESIDUAL, TRACE_COSINE)
E_NORM_MEAN = "e_norm_mean"  # mean ‖e‖ of the probe batch
H0_NORM_MEAN = "h0_norm_mean"  # mean ‖h_0‖ of the probe batch

# ---- the injection's spectrum (`RunWriter.log_spectrum`): eigenvalues of Ā and these -------
RHO = "rho"  # ρ(Ā), the largest |eigenvalue|
NORM_A, NORM_B, NORM_C, NORM_E = "norm_a", "norm_b", "norm_c", "norm_e"  # ‖Ā‖₂ ‖B̄‖₂ ‖C‖₂ mean ‖e‖
SPECTRUM_FIELDS = (RHO, NORM_A, NORM_B, NORM_C, NORM_E)

# ---- analysis arrays (`RunWriter.log_analysis`: the analysis probe and `stabilitylab analyze`)
JACOBIAN_RADIUS = "jacobian_radius"  # ρ(∂F/∂h) at h_T, last position
JACOBIAN_MODULI = "jacobian_moduli"  # |λ| of the leading Jacobian eigenvalues
LYAPUNOV = "lyapunov"  # the leading finite-time Lyapunov exponents
ANALYSIS_ARRAYS = (JACOBIAN_RADIUS, JACOBIAN_MODULI, LYAPUNOV)
ANALYSIS_K = 8  # eigenvalues and exponents per analysis probe

# ---- adaptive exit (`stabilitylab exit`, analysis/exits.py): arrays at the checkpoint step -----
EXIT_LOSS_BY_DEPTH = "exit_loss_by_depth"  # loss of the readout at t = 1..D (no exit)
EXIT_PRED_CORR = "exit_pred_corr"  # Pearson r of predicted vs measured latent exit depth, one per ε
EXIT_PRED_ERROR = "exit_pred_median_error"  # median |predicted − measured| exit depth, one per ε
EXIT_ARRAYS = (EXIT_LOSS_BY_DEPTH, EXIT_PRED_CORR, EXIT_PRED_ERROR)
EXIT_RESULT = "exit_report"  # the run's result document: the whole ExitReport (curves, per-token predictions)

# ---- evaluations (`RunWriter.log_eval`): one value per (step, test-time depth) -------------
VAL_LOSS = "val_loss"  # validation loss, nats per token

# ---- events (`RunWriter.log_event`) ----------------------------------------------------------
SPIKE = "spike"  # loss > median + k·MAD of the rolling window (never terminal)
DIVERGENCE = "divergence"  # a divergence rule fired (docs/training.md)
EARLY_WARNING = "early_warning"  # written back by `stabilitylab events --write`
PROBE_ERROR = "probe_error"  # a probe could not run (e.g. an overflowed state)
EVENT_KINDS = (SPIKE, DIVERGENCE, EARLY_WARNING, PROBE_ERROR)

# ---- config fields as names: a run's config {"model": {"injection": …}} is read back as the
# column "config.model.injection" (list_runs) and swept as "model.injection" ([sweep] grid)
CONFIG_PREFIX = "config."


def dotted(tree: dict, prefix: str = "") -> dict:
    """{"model": {"injection": x}} → {prefix + "model.injection": x}: a nested table's leaves
    under their dotted paths (the one way a config field is named outside its table)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- seeds: salts that keep each random stream apart from every other (seed ^ salt) ----------
PROBE_SALT = 0x9B0BE  # the probe batch's h_0
EVAL_SALT = 0xE7A1  # the evaluation h_0
BATCH_SALT = 0xDA7A  # the training batches' draws

__all__ = ["LOSS", "LR", "GRAD_NORM", "GRAD_NORM_ROLE", "TOKENS_PER_S", "TOKENS", "FLOPS", "WALL_TIME",
           "DEPTH_N_MEAN", "DEPTH_K_MEAN", "DEPTH_TOTAL_MAX", "STATE_NORM", "STATE_NORM_MEAN", "SCALARS",
           "RADIUS_ESTIMATE", "CONTRACTION_RATE", "MONITOR_SCALARS",
           "TRACE_STATE_NORM_MEAN", "TRACE_STATE_NORM_MAX", "TRACE_DELTA_NORM_MEAN",
           "TRACE_REL_RESIDUAL", "TRACE_COSINE", "TRACE_FIELDS", "E_NORM_MEAN", "H0_NORM_MEAN", "RHO", "NORM_A", "NORM_B", "NORM_C", "NORM_E",
           "SPECTRUM_FIELDS", "JACOBIAN_RADIUS", "JACOBIAN_MODULI", "LYAPUNOV", "ANALYSIS_ARRAYS", "ANALYSIS_K",
           "EXIT_LOSS_BY_DEPTH", "EXIT_PRED_CORR", "EXIT_PRED_ERROR", "EXIT_ARRAYS", "EXIT_RESULT",
           "VAL_LOSS", "SPIKE", "DIVERGENCE", "EARLY_WARNING", "PROBE_ERROR", "EVENT_KINDS", "PROBE_SALT",
           "EVAL_SALT", "BATCH_SALT", "CONFIG_PREFIX", "dotted"]
