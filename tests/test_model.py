"""The looped LM: the loop map, truncated backprop, per-element depths, traces, blocks."""

import pytest
import torch
from torch.func import jvp, vmap

import stabilitylab as sl
from stabilitylab.model.blocks import Block

TINY = dict(vocab_size=32, block_size=16, d_model=16, n_heads=2)


def tiny(**kw) -> sl.ModelConfig:
    return sl.ModelConfig(**{**TINY, **kw})


def perturbed(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its init so that blocks are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)
    return model


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randint(0, 32, (3, 10))


def test_every_block_is_the_identity_at_init():
    for core in (False, True):
        block = Block(tiny(n_prelude=1), core=core, has_ve=True)
        x = torch.randn(2, 8, 16)
        rope = sl.LoopedLM(tiny()).rope_8
        torch.testing.assert_close(block(x, rope, torch.randn(2, 8, 16)), x, rtol=0, atol=0)


def test_loop_map_composed_T_times_is_the_models_own_loop(batch):
    model = perturbed(sl.LoopedLM(tiny(n_core=2, value_embed_layers=(1, 2)))).eval()
    e = model.encode(batch)
    h0 = model.initial_state(e)
    F = model.loop_map(e, batch)
    h = h0
    with torch.no_grad():
        for _ in range(5):
            h = F(h)
        out = model(batch, depth=5, h0=h0)
    torch.testing.assert_close(out.state, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, model.decode(h, batch), rtol=1e-5, atol=1e-5)


def test_jvp_through_the_loop_map_matches_finite_differences(batch):
    model = perturbed(sl.LoopedLM(tiny())).double().eval()
    e = model.encode(batch[:1])
    F = model.loop_map(e, batch[:1])
    h = model.initial_state(e) + 0.1
    v = torch.randn_like(h)
    _, Jv = jvp(F, (h,), (v,))
    eps = 1e-6
    fd = (F(h + eps * v) - F(h - eps * v)) / (2 * eps)
    torch.testing.assert_close(Jv, fd, rtol=1e-6, atol=1e-7)


def test_loop_map_batches_tangents_under_vmap(batch):
    model = perturbed(sl.LoopedLM(tiny())).double().eval()
    e = model.encode(batch[:1])
    F = model.loop_map(e, batch[:1])
    h = model.initial_state(e)
    tangents = torch.randn(4, *h.shape, dtype=h.dtype)
    batched = vmap(lambda v: jvp(F, (h,), (v,))[1])(tangents)
    one_by_one = torch.stack([jvp(F, (h,), (v,))[1] for v in tangents])
    torch.testing.assert_close(batched, one_by_one)


def test_loop_map_asks_for_tokens_when_a_core_layer_has_a_value_embedding(batch):
    model = sl.LoopedLM(tiny(n_prelude=2, n_core=2, n_coda=2))  # ve at effective layers 1, 3, 5
    with pytest.raises(ValueError, match="tokens"):
        model.loop_map(model.encode(batch))


def test_gradients_flow_only_through_the_last_k_iterations(batch):
    model = perturbed(sl.LoopedLM(tiny())).double()
    e_params = dict(model.named_parameters())
    h0 = model.initial_state(model.encode(batch)).detach().requires_grad_(True)
    out = model(batch, targets=batch, depth=sl.Depth(3, 2), h0=h0)
    out.loss.backward()
    assert h0.grad is None, "h_0 feeds only no-grad iterations, so it must get no gradient"
    grads = {n: p.grad.clone() for n, p in e_params.items() if p.grad is not None}

    # the same loss with the first 3 iterations replaced by a constant state
    model.zero_grad()
    e = model.encode(batch)
    F = model.loop_map(e, batch)
    with torch.no_grad():
        h = h0
        for _ in range(3):
            h = F(h)
    h = F(F(h.detach()))
    logits = model.decode(h, batch)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten()).backward()
    for name, p in e_params.items():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, msg=name)

    model.zero_grad()
    model(batch, targets=batch, depth=sl.Depth(0, 5), h0=h0).loss.backward()
    assert not torch.allclose(grads["injection.A_log"], model.injection.A_log.grad), \
        "full backprop must differ from truncated backprop"


def test_per_sequence_depths_equal_running_each_sequence_alone(batch):
    model = perturbed(sl.LoopedLM(tiny())).double().eval()
    h0 = model.initial_state(model.encode(batch))
    n, k = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 1])
    together = model(batch, depth=sl.Depth(n, k), h0=h0).state
    for i in range(3):
        alone = model(batch[i:i + 1], depth=sl.Depth(int(n[i]), int(k[i])), h0=h0[i:i + 1]).state
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-12, atol=1e-12)


def test_per_token_depths_freeze_a_token_once_its_count_runs_out(batch):
    model = perturbed(sl.LoopedLM(tiny())).double().eval()
    h0 = model.initial_state(model.encode(batch))
    n = torch.full(batch.shape, 3)
    n[:, 4] = 1  # position 4 stops after one iteration
    frozen = model(batch, depth=sl.Depth(n, 0), h0=h0).state
    after_one = model(batch, depth=sl.Depth(1, 0), h0=h0).state
    torch.testing.assert_close(frozen[:, 4], after_one[:, 4], rtol=0, atol=0)
    assert not torch.allclose(frozen[:, 5], after_one[:, 5])


def test_trace_matches_statistics_of_explicit_states(batch):
    model = perturbed(sl.LoopedLM(tiny())).double().eval()
    e = model.encode(batch)
    h0 = model.initial_state(e)
    trace = model(batch, depth=4, h0=h0, trace=True).trace
    F, states = model.loop_map(e, batch), [h0]
    with torch.no_grad():
        for _ in range(4):
            states.append(F(states[-1]))
    for t in range(1, 5):
        new, old = states[t], states[t - 1]
        norms, delta = new.norm(dim=-1), (new - old).norm(dim=-1)
        assert float(trace.state_norm_mean[t - 1]) == pytest.approx(float(norms.mean()), rel=1e-6)
        assert float(trace.state_norm_max[t - 1]) == pytest.approx(float(norms.max()), rel=1e-6)
        assert float(trace.delta_norm_mean[t - 1]) == pytest.approx(float(delta.mean()), rel=1e-6)
        assert float(trace.rel_residual[t - 1]) == pytest.approx(float((delta / norms).mean()), rel=1e-6)
        cos = torch.nn.functional.cosine_similarity(new, old, dim=-1).mean()
        assert float(trace.cosine[t - 1]) == pytest.approx(float(cos), rel=1e-6)
    assert float(trace.e_norm_mean) == pytest.approx(float(e.detach().norm(dim=-1).mean()))


def test_trace_does_not_change_the_output(batch):
    model = perturbed(sl.LoopedLM(tiny(init_state="seeded")))
    plain = model(batch, targets=batch, depth=3)
    traced = model(batch, targets=batch, depth=3, trace=True)
    assert torch.equal(plain.logits, traced.logits)


def test_a_seeded_initial_state_repeats_ignores_the_global_rng_and_differs_between_seeds(batch):
    model = sl.LoopedLM(tiny(init_state="seeded", init_state_seed=1))
    e = model.encode(batch)
    first = model.initial_state(e)
    torch.manual_seed(12345)  # the global RNG moves; a seeded h_0 must not
    torch.rand(7)
    assert torch.equal(model.initial_state(e), first)
    other = sl.LoopedLM(tiny(init_state="seeded", init_state_seed=2)).initial_state(e)
    assert not torch.equal(other, first) and first.abs().sum() > 0


def test_a_seeded_initial_state_is_drawn_once_per_shape(batch):
    model = sl.LoopedLM(tiny(init_state="seeded", init_state_seed=7))
    first = model.draw_state((3, 10), "cpu", torch.float32)
    assert model.draw_state((3, 10), "cpu", torch.float32) is first  # kept, not redrawn every step
    std = model.cfg.std

    def fresh(*shape):
        return torch.nn.init.trunc_normal_(torch.empty(*shape, model.cfg.state_dim), std=std, a=-3 * std,
                                           b=3 * std, generator=torch.Generator().manual_seed(7))

    assert torch.equal(first, fresh(3, 10))
    other = model.draw_state((2, 10), "cpu", torch.float64)  # a new shape or dtype: the same seed drawn again
    assert other.dtype == torch.float64 and torch.equal(other, fresh(2, 10).double())


def test_reference_initial_state_is_a_fresh_truncated_normal(batch):
    model = sl.LoopedLM(tiny(d_model=64, n_heads=4))
    e = model.encode(torch.randint(0, 32, (64, 16)))
    a, b = model.initial_state(e), model.initial_state(e)
    std = (2 / (5 * 64)) ** 0.5
    assert not torch.equal(a, b)
    assert a.abs().max() <= 3 * std
    assert float(a.std()) == pytest.approx(std * 0.986, rel=0.03)  # a ±3σ cut normal has std 0.986σ


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one_is_a_clear_error(batch, depth):
    with pytest.raises(ValueError, match="depth"):
        sl.LoopedLM(tiny())(batch, depth=depth)


def test_gpt_baseline_runs_the_same_blocks_once(batch):
    cfg = tiny(n_prelude=1, n_core=2, n_coda=1)
    gpt, looped = sl.GPT(cfg), sl.LoopedLM(cfg)
    assert not gpt.cfg.looped and not hasattr(gpt, "injection")
    extra = {n for n, _ in looped.named_parameters()} - {n for n, _ in gpt.named_parameters()}
    assert all(n.startswith(("injection.", "readout.", "prelude_norm.")) for n in extra)
    out = gpt(batch, targets=batch)
    assert out.logits.shape == (3, 10, 32) and out.state is None and torch.isfinite(out.loss)


def test_sequences_longer_than_block_size_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        sl.LoopedLM(tiny())(torch.zeros(1, 17, dtype=torch.long))


def test_bfloat16_autocast_keeps_logits_float32(batch):
    model = sl.LoopedLM(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, targets=batch, depth=2)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_forward_matches_cpu(batch):
    model = perturbed(sl.LoopedLM(tiny(init_state="zero"))).eval()
    cpu = model(batch, depth=3).logits
    gpu = model.cuda()(batch.cuda(), depth=3).logits.cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", [dict(norm_position="post"), dict(mlp_act="gelu"), dict(rope=False),
                                    dict(qk_norm=False), dict(value_embeds=False), dict(zero_init_out=False),
                                    dict(tie_embeddings=False), dict(prelude_norm=False), dict(norm_fp32=False),
                                    dict(n_kv_heads=1), dict(d_state=24, n_state_heads=3)])
def test_every_ablation_switch_builds_and_trains(batch, option):
    model = sl.LoopedLM(tiny(**option))
    out = model(batch, targets=batch, depth=sl.Depth(1, 2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("core."))


def test_rope_rotates_each_interleaved_pair_by_its_angle():
    from stabilitylab.model.blocks import apply_rope, rope_table

    D, T, base = 8, 6, 50000.0
    x = torch.randn(2, T, 3, D, dtype=torch.float64)
    out = apply_rope(x, rope_table(D, T, base))
    for p in range(T):
        for i in range(D // 2):
            theta = torch.tensor(p * base ** (-2 * i / D), dtype=torch.float64)
            a, b = x[:, p, :, 2 * i], x[:, p, :, 2 * i + 1]
            torch.testing.assert_close(out[:, p, :, 2 * i], a * theta.cos() - b * theta.sin(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out[:, p, :, 2 * i + 1], b * theta.cos() + a * theta.sin(),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_rope_equals_the_complex_rotation_to_float_rounding(compiled):
    """The real (cos, sin) table and both paths of apply_rope (the complex view eager, real
    arithmetic under torch.compile) against x·e^{iθ} computed as complex numbers."""
    from stabilitylab.model.blocks import apply_rope, rope_table

    D, T, base = 32, 64, 50000.0
    table = rope_table(D, T, base)
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # the float32 angles of
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq).double()  # the reference's table
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    torch.testing.assert_close(table.double(), torch.view_as_real(rotation), rtol=0, atol=2 ** -24)
    x = torch.randn(3, T, 4, D)
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    rope = torch.compile(apply_rope, backend="eager", fullgraph=True) if compiled else apply_rope
    torch.testing.assert_close(rope(x, table).double(), expected, rtol=1e-6, atol=1e-5)
    half = rope(x.bfloat16(), table)  # low precision is rotated in float32 and cast back
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=2e-2)


def test_rope_scores_depend_only_on_relative_position():
    from stabilitylab.model.blocks import apply_rope, rope_table

    table = rope_table(16, 32, 50000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(p: int, s: int) -> float:
        qp = apply_rope(q.expand(1, 32, 1, 16), table)[0, p, 0]
        ks = apply_rope(k.expand(1, 32, 1, 16), table)[0, s, 0]
        return float(qp @ ks)

    assert score(10, 7) == pytest.approx(score(25, 22), rel=1e-5)
    assert score(10, 7) != pytest.approx(score(10, 8), rel=1e-3)


@pytest.mark.parametrize("injection", ["add", "parcae", "stable-dense"])
def test_a_model_built_from_a_state_dict_equals_the_original(batch, injection):
    model = perturbed(sl.LoopedLM(tiny(injection=injection, init_state="zero"))).eval()
    rebuilt = sl.LoopedLM.from_state_dict(model.cfg, model.state_dict()).eval()
    assert torch.equal(model(batch, depth=3).logits, rebuilt(batch, depth=3).logits)
