"""The loop interface (model/interface.py): LoopedLM implements it, and the analysis and the
bounds take any implementation; bounds a model cannot have are "not applicable", not failures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from stabilitylab.analysis.bounds import Bounds, check_bounds, default_state
from stabilitylab.analysis.spectra import loop_jacobian
from stabilitylab.config import ModelConfig
from stabilitylab.model import LoopedLM, LoopModel, run_loop


class Rotation(nn.Module):
    """A toy loop model with no injection: h ↦ r·R h per token (R two plane rotations), so every
    eigenvalue of ∂F/∂h has modulus exactly r and ‖h_t‖ = rᵗ‖h_0‖."""

    vocab_size, block_size, state_dim, mu_rec, mu_bwd = 5, 8, 4, 3, 1
    no_linear_part = "the toy has no injection: e only sets h_0"

    def __init__(self, r: float):
        super().__init__()
        self.r = r
        self.embed = nn.Embedding(self.vocab_size, self.state_dim)
        self.head = nn.Linear(self.state_dim, self.vocab_size, bias=False)

    def encode(self, tokens: Tensor) -> Tensor:
        return self.embed(tokens)

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return e

    def loop_map(self, e: Tensor, tokens: Tensor | None = None):
        c, s = math.cos(0.3), math.sin(0.3)
        R = self.r * torch.block_diag(*[torch.tensor([[c, -s], [s, c]], dtype=e.dtype)] * 2)
        return lambda h: h @ R.mT

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.head(h).float()

    def linear_part(self):
        return None


def test_looped_lm_implements_the_interface_with_its_config_numbers():
    model = LoopedLM(ModelConfig.preset("tiny", injection="parcae"))
    assert isinstance(model, LoopModel) and isinstance(Rotation(0.5), LoopModel)
    assert (model.mu_rec, model.mu_bwd, model.state_dim) == (model.cfg.mean_recurrence, model.cfg.mu_bwd,
                                                             model.cfg.state_dim)
    A, B = model.linear_part()
    assert torch.equal(A, model.injection.transition()) and torch.equal(B, model.injection.input_matrix())


def test_run_loop_is_the_forward_of_a_looped_lm():
    torch.manual_seed(0)
    model = LoopedLM(ModelConfig.preset("tiny", injection="parcae", init_state="zero")).eval()
    tokens = torch.randint(0, 64, (2, 8))
    logits, states = run_loop(model, tokens, 5)
    assert len(states) == 6
    torch.testing.assert_close(logits, model(tokens, depth=5).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0.5, 1.25])
def test_the_analysis_takes_a_model_that_is_not_a_looped_lm(r):
    model = Rotation(r)
    tokens = torch.tensor([[1, 2, 3]])
    spectrum = loop_jacobian(model, tokens, depth=2, position=-1, k=2)
    assert spectrum.radius == pytest.approx(r, rel=1e-5)
    h0 = default_state(model, tokens)
    bounds = Bounds(rho_margin=0.0, max_input_norm=1.0, max_readout_norm=1.0, max_state_growth=1.0,
                    max_jacobian_radius=1.0)
    report = check_bounds(model, bounds, tokens=tokens, h0=h0)
    for name in ("rho_margin", "max_input_norm"):
        result = report.result(name)
        assert result.not_applicable == Rotation.no_linear_part and result.passed and result.verdict == "n/a"
    assert "without a linear readout" in report.result("max_readout_norm").not_applicable
    assert report.result("max_state_growth").measured == pytest.approx(r ** (4 * 3 - 3), rel=1e-5)
    assert report.result("max_jacobian_radius").passed == (r <= 1)
    assert report.passed == (r <= 1)
    assert "not applicable: the toy has no injection" in report.table()
    assert report.to_dict()["results"][0]["applicable"] is False
    assert 'skipped="3"' in report.junit()
