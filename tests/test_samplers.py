"""
Tests for samplers.py: the schedule against diffusers, the samplers against closed forms
(a Gaussian data distribution has an exact velocity field and an exact flow map), Eq. 2
against its definition, the NFE counts, and the teacher-target identity of Algorithm 1.

    python -m pytest -q tests/test_samplers.py
"""

import pytest
import torch

import embed
import oracles  # tests/oracles.py: z written from the paper on the raw weights
import samplers
from mmdit import CONFIGS, MMDiT
from samplers import (
    NFECounter, check_w, conditional, euler, flow_sigmas, guidance_scale_to_w, guided, reflection_step,
    sample, teacher_target, w_to_guidance_scale, zsampling,
)


# -----------------------------------------------------------------------------
# Helpers: an analytic "network", a call recorder, a tiny MMDiT


def gaussian_net(s):
    """The exact velocity of data x0 ~ N(mu, s^2 I) on the path x_t = (1 - t) x0 + t eps, as a
    network whose condition is the data mean mu: v = E[eps | x_t] - E[x0 | x_t], where x_t is
    Gaussian with mean m = (1 - t) mu and variance var = (1 - t)^2 s^2 + t^2, so
    E[eps | x_t] = t / var (x_t - m) and E[x0 | x_t] = mu + (1 - t) s^2 / var (x_t - m).
    Its flow map is affine: x_t = m + sqrt(var) z with z constant, so x_0 = mu + s x_1."""

    def net(x, t, mu):
        t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ...)
        m = (1 - t) * mu
        var = (1 - t) ** 2 * s**2 + t**2
        return t / var * (x - m) - (mu + (1 - t) * s**2 / var * (x - m))

    return net


class Recorder:
    """Wraps a network and records, per call, the batch size and the first time label."""

    def __init__(self, net):
        self.net, self.batches, self.times = net, [], []

    def __call__(self, x, t, *cond, **kwargs):
        self.batches.append(x.shape[0])
        self.times.append(float(t[0]))
        return self.net(x, t, *cond, **kwargs)


def zero_field(x, t):
    return torch.zeros_like(x)


def tiny_mmdit(seed):
    """tiny-sd3 with random weights (MMDiT's own init is adaLN-zero: its output starts at 0)."""
    torch.manual_seed(seed)
    model = MMDiT(CONFIGS["tiny-sd3"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def mmdit_inputs(B=2, L=5, size=8, seed=0):
    cfg = CONFIGS["tiny-sd3"]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, cfg.in_channels, size, size, generator=g)  # (B, C, H, W)
    context = torch.randn(B, L, cfg.context_dim, generator=g)  # (B, L, Dc)
    y = torch.randn(B, cfg.pooled_dim, generator=g)  # (B, Dy)
    context_null = torch.randn(1, L, cfg.context_dim, generator=g)  # (1, L, Dc)
    y_null = torch.randn(1, cfg.pooled_dim, generator=g)  # (1, Dy)
    return noise, context, y, context_null, y_null


# -----------------------------------------------------------------------------
# The schedule


def test_flow_sigmas_equal_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps in (1, 2, 7, 28, 50, 100):
        for shift in (3.0, 1.0):
            ref = FlowMatchEulerDiscreteScheduler(shift=shift)
            ref.set_timesteps(steps)
            assert torch.equal(flow_sigmas(steps, shift), ref.sigmas), (steps, shift)


def test_flow_sigmas_sd3_values():
    # SPEC section 4: N = 28 starts 1.0, 0.98738, 0.97411 and ends 0.11091, 0.00893, 0
    s = flow_sigmas(28)
    assert s.shape == (29,) and s.dtype == torch.float32
    expected = torch.tensor([1.0, 0.98738, 0.97411, 0.11091, 0.00893, 0.0])
    assert torch.allclose(s[[0, 1, 2, -3, -2, -1]], expected, atol=5e-6)
    # the smallest nonzero time is shift(shift(1/1000)): sigma_min is shifted twice
    once = 3 * 1e-3 / (1 + 2 * 1e-3)
    assert abs(s[-2].item() - 3 * once / (1 + 2 * once)) < 1e-7


# -----------------------------------------------------------------------------
# Guidance values


def test_guidance_scale_conversion():
    assert w_to_guidance_scale(4.0) == 5.0 and guidance_scale_to_w(5.0) == 4.0
    assert w_to_guidance_scale(0.0) == 1.0  # w = 0: the conditional model alone
    w = torch.tensor([0.0, 2.5, 13.0])
    assert torch.equal(guidance_scale_to_w(w_to_guidance_scale(w)), w)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), torch.tensor([1.0, -1.0])])
def test_bad_w_is_refused(bad):
    with pytest.raises(ValueError, match="w"):
        check_w(bad)
    with pytest.raises(ValueError, match="w"):
        w_to_guidance_scale(bad)
    with pytest.raises(ValueError, match="w"):
        guided(gaussian_net(1.0), (torch.zeros(2, 3),), (torch.zeros(1, 3),), bad)


def test_guidance_scale_below_one_is_refused():
    with pytest.raises(ValueError, match="guidance_scale"):
        guidance_scale_to_w(0.5)


# -----------------------------------------------------------------------------
# Euler against a closed form


def test_euler_converges_to_the_exact_gaussian_endpoint():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(4, 3, generator=g, dtype=torch.float64)  # noise at t = 1
    s = 0.5
    exact = mu + s * x1  # the flow map of a Gaussian, see gaussian_net
    v = conditional(gaussian_net(s), (mu,))
    errors = [(euler(v, x1, flow_sigmas(N)) - exact).abs().max().item() for N in (25, 50, 100, 200)]
    # first order: halving h halves the error
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.8 < coarse / fine < 2.2, errors
    assert errors[-1] < 0.02


# -----------------------------------------------------------------------------
# CFG (Eq. 2)


def test_cfg_is_eq2_in_one_batched_call():
    B = 3
    g = torch.Generator().manual_seed(1)
    x, mu = torch.randn(B, 4, 2, generator=g), torch.randn(B, 4, 2, generator=g)
    mu_null = torch.randn(1, 4, 2, generator=g)
    t = torch.full((B,), 0.7)
    net = Recorder(gaussian_net(0.8))
    v_c = gaussian_net(0.8)(x, t, mu)
    v_null = gaussian_net(0.8)(x, t, mu_null.expand(B, 4, 2))
    for w in (0.0, 4.5, torch.tensor([0.0, 2.0, 13.0])):
        net.batches.clear()
        out = guided(net, (mu,), (mu_null,), w)(x, t)
        assert net.batches == [2 * B]  # one call, cond and null stacked on the batch
        w_ = w.view(B, 1, 1) if torch.is_tensor(w) else w
        assert torch.equal(out, (1 + w_) * v_c - w_ * v_null)


def test_cfg_on_mmdit_matches_two_separate_calls():
    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs()
    t = torch.tensor([0.9, 0.3])
    w = torch.tensor([1.5, 6.0])
    counter = NFECounter()
    with torch.no_grad():
        out = guided(model, (context, y), (context_null, y_null), w, counter)(noise, t)
        v_c = model(noise, t, context, y)
        v_null = model(noise, t, context_null.expand_as(context), y_null.expand_as(y))
    assert counter.calls == 1 and counter.per_sample(2) == 2
    assert torch.allclose(out, (1 + w.view(2, 1, 1, 1)) * v_c - w.view(2, 1, 1, 1) * v_null, atol=1e-5)


def test_euler_cfg_matches_a_diffusers_scheduler_loop():
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(2)
    x1, mu = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mu_null = torch.zeros(1, 4, 3)
    net, w = gaussian_net(0.6), 3.0
    ours = euler(guided(net, (mu,), (mu_null,), w), x1, flow_sigmas(28))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    x, g_scale = x1.clone(), w_to_guidance_scale(w)
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(2)  # diffusers' timesteps are 1000 t
        v_c, v_u = net(x, t, mu), net(x, t, mu_null.expand_as(mu))
        x = scheduler.step(v_u + g_scale * (v_c - v_u), timestep, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


# -----------------------------------------------------------------------------
# Reflection (Eq. 3-4)


@pytest.mark.parametrize("tau", ["t", "t_next", "offset"])
def test_inversion_undoes_a_denoise_step_to_second_order(tau):
    # with the same exact field for both moves (no guidance gap), denoise-then-invert returns
    # to the start up to O(h^2); a zero final field makes reflection_step return x~ itself
    g = torch.Generator().manual_seed(3)
    mu, x = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    v = conditional(gaussian_net(0.7), (mu,))
    t = torch.full((2,), 0.6, dtype=torch.float64)
    errors = []
    for h in (0.04, 0.02, 0.01):
        label = h if tau == "offset" else tau  # an offset as in the SD3.5 code: tau = t - O(h)
        x_tilde = reflection_step(v, v, zero_field, x, t, t - h, label)[0]
        errors.append((x_tilde - x).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.4 < coarse / fine < 4.6, errors


@pytest.mark.parametrize("tau, offset", [("t", None), ("t_next", None), ("t-1/N", 0.035), (0.1, 0.1)])
def test_inversion_time_label(tau, offset):
    sigmas = flow_sigmas(28)
    net = Recorder(gaussian_net(1.0))
    mu = torch.zeros(1, 3)
    v = guided(net, (mu,), (mu,), 2.0)
    zsampling(v, v, torch.randn(1, 3), sigmas, tau=tau)
    # per reflected step: denoise (t_i), invert (tau), denoise (t_i); the last step is plain Euler
    assert len(net.times) == 3 * 27 + 1
    for i in range(27):
        t_i, t_next = sigmas[i].item(), sigmas[i + 1].item()
        expected = {"t": t_i, "t_next": t_next}.get(tau, max(t_i - (offset or 0), 0.0))
        assert net.times[3 * i] == net.times[3 * i + 2] == pytest.approx(t_i)
        assert net.times[3 * i + 1] == pytest.approx(expected, abs=1e-6), (i, tau)


def test_reflection_with_no_gap_and_zero_steps_is_euler():
    g = torch.Generator().manual_seed(4)
    mu, x1 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    v = guided(gaussian_net(0.5), (mu,), (torch.zeros(1, 3),), 2.0)
    sigmas = flow_sigmas(10)
    assert torch.equal(zsampling(v, v, x1, sigmas, reflect_steps=0), euler(v, x1, sigmas))


# -----------------------------------------------------------------------------
# NFE


def test_nfe_counts_of_the_five_samplers():
    model, strong, weak = tiny_mmdit(0), tiny_mmdit(1), tiny_mmdit(2)
    noise, context, y, context_null, y_null = mmdit_inputs(B=2)
    N = 4
    args = (model, noise, context, y, context_null, y_null)
    expected = {"euler": N, "cfg": 2 * N, "zsampling": 6 * (N - 1) + 2, "w2sd": 6 * (N - 1) + 2}
    for method, nfe in expected.items():
        w = None if method == "euler" else 4.0
        x0, counted = sample(method, *args, w=w, steps=N, strong=strong, weak=weak)
        assert counted == nfe, method
        assert x0.shape == noise.shape and torch.isfinite(x0).all()
    # lambda reflected steps cost 4 more NFE each than Euler + CFG
    for k in (0, 1, N):
        assert sample("zsampling", *args, w=4.0, steps=N, reflect_steps=k)[1] == 2 * N + 4 * k


def test_student_is_one_forward_per_step():
    model = tiny_mmdit(0)
    noise, context, y, _, y_null = mmdit_inputs(B=2)
    t = torch.tensor([0.8, 0.4])
    w = torch.tensor([3.0, 9.0])
    counter = NFECounter()
    with torch.no_grad():
        out = samplers.student(model, context, y, y_null, w, counter)(noise, t)
        # z of Eq. 7 written from the paper on the raw weights (tests/oracles.py), through the network
        ref = model(noise, t, context, y, vec=oracles.conditioning(model, "teefusion", t, y, y_null, w))
    assert counter.calls == 1 and counter.per_sample(2) == 1  # one forward, conditional tokens only
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="w must be >= 0"):
        samplers.student(model, context, y, y_null, -1.0)
    _, nfe = sample("student", model, noise, context, y, y_null=y_null, w=5.0, steps=5)
    assert nfe == 5


def test_student_steps_precompute_every_step_of_the_schedule():
    """student_steps: the conditioning of all N steps at once (G(psi(t)) and every adaLN output, N * B
    rows per matrix product) gives each step's velocity as `student` does, to float rounding."""
    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs(B=2)
    sigmas = samplers.flow_sigmas(6)
    for name in ("teefusion", "dice"):
        fusion = embed.make_fusion(name, model.config)
        counter = NFECounter()
        with torch.no_grad():
            steps = samplers.student_steps(model, context, y, y_null, 4.0, sigmas[:-1], counter, fusion, context_null)
            per_call = samplers.student(model, context, y, y_null, 4.0, None, fusion, context_null)
            for i, v in enumerate(steps):
                t = sigmas[i].expand(2)
                torch.testing.assert_close(v(noise, t), per_call(noise, t), rtol=1e-5, atol=1e-5)
            x_steps = samplers.euler(steps, noise, sigmas)
            x_call = samplers.euler(per_call, noise, sigmas)
        assert counter.calls == 2 * 6 and counter.per_sample(2) == 2 * 6, name  # each step called twice above
        torch.testing.assert_close(x_steps, x_call, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="5 velocity functions for a schedule of 6 steps"):
        samplers.euler(steps[:5], noise, sigmas)


def test_ablation_students_through_a_fusion_module():
    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs(B=2)
    t, w = torch.tensor([0.8, 0.4]), 3.0
    for name in embed.FUSIONS:
        torch.manual_seed(0)
        fusion = embed.make_fusion(name, model.config)
        counter = NFECounter()
        with torch.no_grad():
            out = samplers.student(model, context, y, y_null, w, counter, fusion, context_null)(noise, t)
            # z by hand from the paper (tests/oracles.py); the tokens: the conditional ones, or DICE's
            # enhanced ones (pinned by hand in tests/test_embed.py::test_dice_enhancer)
            mlp = fusion.guidance_in.mlp if name == "distillcfg" else None
            z = oracles.conditioning(model, name, t, y, y_null, w, guidance_mlp=mlp)
            tokens = fusion.student_context(model, context, context_null) if name == "dice" else context
            torch.testing.assert_close(out, model(noise, t, tokens, y, vec=z), rtol=0, atol=1e-5, msg=name)
        assert counter.per_sample(2) == 1, name
        _, nfe = sample("student", model, noise, context, y, context_null, y_null, w=w, steps=3, fusion=fusion)
        assert nfe == 3, name


# -----------------------------------------------------------------------------
# The teacher target of Algorithm 1


def _teacher_setup():
    g = torch.Generator().manual_seed(5)
    B = 3
    x_t = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)
    mu_null = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    t_next = torch.tensor([0.85, 0.3, 0.0], dtype=torch.float64)
    w = torch.tensor([0.0, 2.0, 7.5], dtype=torch.float64)  # per-sample guidance
    nets = {"main": gaussian_net(1.0), "strong": gaussian_net(0.6), "weak": gaussian_net(1.6)}
    return x_t, (mu,), (mu_null,), t, t_next, w, nets


def _paper_step(kind, x, mu, mu_null, t, t_next, w, nets, w_inv, tau_label, w_weak, final, target="step"):
    """One teacher step of one sample, written from the paper's equations with the closed-form
    velocities (no code from samplers.py): Eq. 2 for CFG; Eq. 3 (denoise, invert) and Eq. 4 (move
    from the reflected point) for the reflection teachers. Returns x at t_next; with target
    "reflected", x + h v where v is Eq. 4's velocity at the reflected point (the other reading of
    Algorithm 1's refined target)."""
    def cfg(net, x, s, scale):  # Eq. 2 at guidance `scale`, two separate evaluations
        ts = torch.tensor([s], dtype=torch.float64)
        return (1 + scale) * net(x, ts, mu) - scale * net(x, ts, mu_null)

    h = t_next - t
    if kind == "cfg":
        return x + h * cfg(nets["main"], x, t, w)
    if kind == "zsampling":
        denoise, invert, move = (nets["main"], w), (nets["main"], w_inv), (nets["main"], w)
    else:
        denoise, invert, move = (nets["strong"], w), (nets["weak"], w_weak), (nets[final], w)
    x_prime = x + h * cfg(*denoise[:1], x, t, denoise[1])  # Eq. 3: denoise t -> t_next
    x_tilde = x_prime - h * cfg(invert[0], x_prime, tau_label, invert[1])  # Eq. 3: invert back to t
    v_move = cfg(move[0], x_tilde, t, move[1])  # Eq. 4: M(x~_t, t)
    return x_tilde + h * v_move if target == "step" else x + h * v_move


def _eq3_label(kind, t, steps=50):
    """The inversion's time label: W2SD's Eq. 3, x~_t = M_inv^w(M^s(x_t, t), t), inverts AT t; Z-Sampling on
    a flow model at its authors' CoRe label max(0, t - 1000 // N) on the 1000 scale."""
    return t if kind == "w2sd" else max(t - (1000 // steps) / 1000, 0.0)


@pytest.mark.parametrize("target", ["step", "reflected"])
@pytest.mark.parametrize("kind, final", [("cfg", None), ("zsampling", None), ("w2sd", "strong"), ("w2sd", "main")])
def test_one_student_step_on_the_target_is_one_teacher_step(kind, final, target):
    """A student matching u takes the teacher's step in ONE Euler step: x_t + (t_next - t) u equals
    the step written from the paper's equations (Eq. 2-4), at the defaults of each teacher:
    Z-Sampling's flow preset (w_inv = -0.5, tau = t - 0.02 at N = 50), W2SD's Eq. 3 (the weak model
    inverts at t, its guidance 0) and Eq. 4's strong final move (or the W2SD release's main model).
    target "reflected": u is Eq. 4's velocity at the reflected point (for CFG, Eq. 2's at x_t)."""
    x_t, (mu,), (mu_null,), t, t_next, w, nets = _teacher_setup()
    counter = NFECounter()
    kw = dict(strong=nets["strong"], weak=nets["weak"], main=nets["main"] if final == "main" else None)
    u = teacher_target(kind, nets["main"], x_t, t, t_next, (mu,), (mu_null,), w, steps=50, counter=counter,
                       target=target, **kw)
    assert counter.per_sample(3) == {"cfg": 2, "zsampling": 6, "w2sd": 6}[kind]
    x_student = x_t + (t_next - t).view(-1, 1, 1) * u
    for b in range(3):
        ref = _paper_step(kind, x_t[b:b + 1], mu[b:b + 1], mu_null, t[b].item(), t_next[b].item(), w[b].item(),
                          nets, -0.5, _eq3_label(kind, t[b].item()), 0.0, final, target)
        assert torch.allclose(x_student[b:b + 1], ref, rtol=0, atol=1e-12), (kind, final, target, b)


def test_w2sd_inverts_at_t_unless_told_otherwise():
    """Eq. 3's label is the default; CoRe's t - 1/N (Z-Sampling's flow detail) stays a named choice, and
    the two differ (at N = 50 the offset 0.02 is about 3x the step near t = 1)."""
    x_t, (mu,), (mu_null,), t, t_next, w, nets = _teacher_setup()
    kw = dict(strong=nets["strong"], weak=nets["weak"], steps=50)
    u_core = teacher_target("w2sd", nets["main"], x_t, t, t_next, (mu,), (mu_null,), w, tau="t-1/N", **kw)
    u_eq3 = teacher_target("w2sd", nets["main"], x_t, t, t_next, (mu,), (mu_null,), w, **kw)
    for b in range(3):
        label = max(t[b].item() - 0.02, 0.0)
        ref = _paper_step("w2sd", x_t[b:b + 1], mu[b:b + 1], mu_null, t[b].item(), t_next[b].item(), w[b].item(),
                          nets, -0.5, label, 0.0, "strong")
        h = (t_next[b] - t[b]).item()
        assert torch.allclose(x_t[b:b + 1] + h * u_core[b:b + 1], ref, rtol=0, atol=1e-12), b
    assert (u_core - u_eq3).abs().max() > 1e-3
    assert samplers.reflection_settings("flow", None, None, "w2sd")[1] == "t"
    assert samplers.reflection_settings("flow", None, None, "zsampling")[1] == "t-1/N"


def test_eq4_moves_with_the_strong_model_not_the_teacher():
    """W2SD's target moves with `strong` (Eq. 4), never with the `net` argument, against the paper's step
    written by hand; the W2SD release's main model is another step."""
    x_t, (mu,), (mu_null,), t, t_next, w, nets = _teacher_setup()
    u = teacher_target("w2sd", nets["main"], x_t, t, t_next, (mu,), (mu_null,), w, strong=nets["strong"],
                       weak=nets["weak"], steps=50)  # net = the main model, unused by Eq. 4
    for b in range(3):
        args = (x_t[b:b + 1], mu[b:b + 1], mu_null, t[b].item(), t_next[b].item(), w[b].item(), nets, -0.5,
                t[b].item(), 0.0)
        h = (t_next[b] - t[b]).item()
        assert torch.allclose(x_t[b:b + 1] + h * u[b:b + 1], _paper_step("w2sd", *args, "strong"), rtol=0, atol=1e-12)
        assert (x_t[b:b + 1] + h * u[b:b + 1] - _paper_step("w2sd", *args, "main")).abs().max() > 1e-4


def test_last_step_target_is_the_plain_guided_velocity():
    """Where the sampler does not reflect (its last step), the target is the final model's CFG."""
    x_t, cond, null, t, t_next, w, nets = _teacher_setup()
    reflect = torch.tensor([True, False, False])
    for kind, kw, mover in (("zsampling", {}, "main"), ("w2sd", dict(weak=nets["weak"]), "strong"),
                            ("w2sd", dict(weak=nets["weak"], main=nets["main"]), "main")):
        net = nets["main"] if "main" in kw or kind == "zsampling" else nets["strong"]
        if kind == "w2sd":
            kw = dict(kw, strong=nets["strong"])
        u = teacher_target(kind, net, x_t, t, t_next, cond, null, w, reflect=reflect, steps=50, **kw)
        full = teacher_target(kind, net, x_t, t, t_next, cond, null, w, steps=50, **kw)
        plain = guided(nets[mover], cond, null, w)(x_t, t)
        assert torch.equal(u[0], full[0])
        assert torch.allclose(u[1:], plain[1:], rtol=0, atol=1e-12), kind


def test_teacher_target_on_mmdit_costs_one_teacher_step():
    model, strong, weak = tiny_mmdit(0), tiny_mmdit(1), tiny_mmdit(2)
    x_t, context, y, context_null, y_null = mmdit_inputs(B=2)
    t, t_next, w = torch.tensor([0.7, 0.3]), torch.tensor([0.68, 0.28]), torch.tensor([2.0, 14.0])
    for kind, nfe in (("cfg", 2), ("zsampling", 6), ("w2sd", 6)):
        counter = NFECounter()
        u = teacher_target(kind, model, x_t, t, t_next, (context, y), (context_null, y_null), w, steps=50,
                           strong=strong, weak=weak, counter=counter)
        assert u.shape == x_t.shape and torch.isfinite(u).all() and not u.requires_grad
        assert counter.per_sample(2) == nfe and counter.calls == nfe // 2, kind  # every call batched


def test_the_reflection_refines_cfg_by_the_papers_amount():
    """What Eq. 3-4 add to Eq. 2's target, u_reflection - u_cfg, equals the same difference of the paper's
    steps written by hand (divided by the step), and is not negligible: the refinement Algorithm 1
    distills."""
    x_t, (mu,), (mu_null,), t, t_next, w, nets = _teacher_setup()
    kw = dict(strong=nets["strong"], weak=nets["weak"], steps=50)
    u = {k: teacher_target(k, nets["main"], x_t, t, t_next, (mu,), (mu_null,), w, **kw)
         for k in ("cfg", "zsampling", "w2sd")}
    for kind in ("zsampling", "w2sd"):
        for b in range(3):
            args = (x_t[b:b + 1], mu[b:b + 1], mu_null, t[b].item(), t_next[b].item(), w[b].item(), nets, -0.5)
            h = (t_next[b] - t[b]).item()
            by_hand = (_paper_step(kind, *args, _eq3_label(kind, t[b].item()), 0.0, "strong")
                       - _paper_step("cfg", *args, None, 0.0, None)) / h
            assert torch.allclose(u[kind][b:b + 1] - u["cfg"][b:b + 1], by_hand, rtol=0, atol=1e-9), (kind, b)
        assert (u[kind] - u["cfg"]).abs().max() > 1e-2, kind


# -----------------------------------------------------------------------------
# The authors' settings: Z-Sampling (CoRe's flow-matching zigzag) and W2SD (its release), by default


def _diffusers_times(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps, scheduler.sigmas  # timesteps on the 1000 scale, sigmas with a final 0


def _analytic_inputs(B=2, seed=6):
    g = torch.Generator().manual_seed(seed)
    noise, mu = torch.randn(B, 3, 4, generator=g), torch.randn(B, 3, 4, generator=g)
    mu_null = 0.3 * torch.randn(1, 3, 4, generator=g)
    y, y_null = torch.zeros(B, 1), torch.zeros(1, 1)  # pooled vectors the analytic model ignores
    return noise, mu, mu_null, y, y_null


def _mmdit_like(s):
    """The Gaussian closed form as a model with the MMDiT's call: net(x, t, context, y)."""
    net = gaussian_net(s)
    return lambda x, t, context, y, vec=None: net(x, t, context)


@pytest.mark.parametrize("steps", [6, 28])
def test_zsampling_defaults_are_the_authors_flow_matching_zigzag(steps):
    """The reference loop follows the Z-Sampling authors' SD3.5 `zigzag` in diffusers' terms:
    timesteps t on the 1000 scale, guidance uncond + g (cond - uncond) with g = 1 + w; on every
    step but the last: denoise at g, invert over the SAME interval at g = 0.5 with the label
    max(0, t - 1000 // N), denoise again at g; the last step plain."""
    noise, mu, mu_null, y, y_null = _analytic_inputs()
    net, w = _mmdit_like(0.7), 3.5
    ours, nfe = sample("zsampling", net, noise, mu, y, mu_null, y_null, w=w, steps=steps)
    timesteps, sigmas = _diffusers_times(steps)
    g = w_to_guidance_scale(w)

    def guided_eps(x, timestep, scale):
        tt = (timestep / 1000).expand(x.shape[0])
        uncond, cond = net(x, tt, mu_null.expand_as(mu), y), net(x, tt, mu, y)
        return uncond + scale * (cond - uncond)

    x = noise.clone()
    for i, timestep in enumerate(timesteps):
        dt = sigmas[i + 1] - sigmas[i]
        x = x + dt * guided_eps(x, timestep, g)
        if i < steps - 1:
            label = torch.clamp(timestep - 1000 // steps, min=0)
            x = x - dt * guided_eps(x, label, 0.5)
            x = x + dt * guided_eps(x, timestep, g)
    assert nfe == 6 * (steps - 1) + 2
    assert torch.allclose(ours, x, atol=2e-5), (ours - x).abs().max()
    sdxl, _ = sample("zsampling", net, noise, mu, y, mu_null, y_null, w=w, steps=steps, preset="sdxl")
    assert (sdxl - x).abs().max() > 1e-3  # the SDXL release's settings are another sampler


@pytest.mark.parametrize("with_main", [False, True])
def test_w2sd_defaults_are_eq4_with_the_release_guidance(with_main):
    """W2SD as the paper's Eq. 3-4 run it with the W2SD release's guidance: the strong model denoises
    at g, the weak one inverts at g = 1 (the conditional model) with the time label t of the step
    (Eq. 3: x~_t = M_inv^w(M^s(x_t, t), t), as the release labels it), the strong one moves again
    (with_main: the release's third "main" model moves instead)."""
    noise, mu, mu_null, y, y_null = _analytic_inputs(seed=7)
    strong, weak, main, w, steps = _mmdit_like(0.5), _mmdit_like(1.4), _mmdit_like(0.9), 4.5, 8
    ours, nfe = sample("w2sd", strong, noise, mu, y, mu_null, y_null, w=w, steps=steps, weak=weak,
                       main=main if with_main else None)
    timesteps, sigmas = _diffusers_times(steps)

    def guided_eps(net, x, timestep, scale):
        tt = (timestep / 1000).expand(x.shape[0])
        uncond, cond = net(x, tt, mu_null.expand_as(mu), y), net(x, tt, mu, y)
        return uncond + scale * (cond - uncond)

    mover = main if with_main else strong
    x = noise.clone()
    for i, timestep in enumerate(timesteps):
        dt = sigmas[i + 1] - sigmas[i]
        if i < steps - 1:
            x = x + dt * guided_eps(strong, x, timestep, 5.5)
            x = x - dt * guided_eps(weak, x, timestep, 1.0)  # Eq. 3 and the release: the weak model at t
        x = x + dt * guided_eps(mover, x, timestep, 5.5)
    assert nfe == 6 * (steps - 1) + 2
    assert torch.allclose(ours, x, atol=2e-5), (ours - x).abs().max()


def test_a_zsampling_step_is_cfg_at_2w_minus_w_inv_to_first_order():
    """One Z-Sampling step at w and one CFG step at w' = 2w - w_inv from the same point differ by
    O(h^2); CFG at w differs by O(h)."""
    g = torch.Generator().manual_seed(8)
    x, mu, mu_null = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    net, w, w_inv = gaussian_net(0.8), 4.0, -0.5
    assert samplers.first_order_cfg_w(w, w_inv) == 8.5 and samplers.first_order_cfg_w(4.0) == 8.5
    t = torch.full((2,), 0.6, dtype=torch.float64)
    v_w, v_inv = guided(net, (mu,), (mu_null,), w), guided(net, (mu,), (mu_null,), w_inv, min_w=-1.0)
    gaps = {"w'": [], "w": []}
    for h in (0.02, 0.01, 0.005):
        x_z = samplers.reflection_step(v_w, v_inv, v_w, x, t, t - h, "t")[0]
        for name, scale in (("w'", 2 * w - w_inv), ("w", w)):
            x_c = samplers.euler_step(guided(net, (mu,), (mu_null,), scale), x, t, t - h)
            gaps[name].append((x_z - x_c).abs().max().item())
    assert all(3.3 < a / b < 4.7 for a, b in zip(gaps["w'"], gaps["w'"][1:])), gaps  # second order
    assert all(1.7 < a / b < 2.3 for a, b in zip(gaps["w"], gaps["w"][1:])), gaps  # first order


# -----------------------------------------------------------------------------
# The sampler's step from any t (what distillation regresses on)


@pytest.mark.parametrize("steps", [2, 20, 50])
def test_schedule_step_is_the_samplers_step(steps):
    sigmas = flow_sigmas(steps)
    t_next, reflects = samplers.schedule_step(sigmas[:-1], steps)
    assert torch.equal(t_next, sigmas[1:])  # on the schedule: exactly its step
    assert reflects.tolist() == [True] * (steps - 1) + [False]  # the last step is plain
    # between the schedule's times: strictly below t, increasing with t, continuous
    t = torch.linspace(1e-4, 1.0, 20001, dtype=torch.float64)
    t_next, reflects = samplers.schedule_step(t, steps)
    assert torch.all(t_next < t) and torch.all(t_next >= 0) and torch.all(t_next[1:] >= t_next[:-1])
    assert (t_next[1:] - t_next[:-1]).abs().max() < 1e-3
    assert torch.equal(reflects, t > sigmas[-2].double())  # reflect everywhere above the last step's start
    # the step length at t = 1 is the schedule's first, ~0.007 at N = 50; near t = 0.2 it is ~0.05
    if steps == 50:
        big = samplers.schedule_step(torch.tensor([0.2]), 50)[0]
        assert 0.03 < 0.2 - big.item() < 0.07 and 1 - sigmas[1].item() < 0.01
# -----------------------------------------------------------------------------
# Refused arguments


def test_refused_arguments():
    x_t, cond, null, t, t_next, w, nets = _teacher_setup()
    main = nets["main"]
    with pytest.raises(ValueError, match="t_next < t"):
        teacher_target("cfg", main, x_t, t_next, t, cond, null, w)
    with pytest.raises(ValueError, match="unknown sampler"):
        teacher_target("ddim", main, x_t, t, t_next, cond, null, w)
    with pytest.raises(ValueError, match="needs a weak network"):
        teacher_target("w2sd", main, x_t, t, t_next, cond, null, w)
    with pytest.raises(ValueError, match="needs the number of sampling steps"):
        teacher_target("zsampling", main, x_t, t, t_next, cond, null, w)  # the flow preset's t - 1/N
    with pytest.raises(ValueError, match="unknown reflection preset"):
        teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, steps=50, preset="sd3")
    for tau in ("t-1", -0.1):
        with pytest.raises(ValueError, match="tau"):
            teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, tau=tau, steps=50)
    with pytest.raises(ValueError, match="w_inv must be >= -1"):
        teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, w_inv=-1.5, steps=50)
    with pytest.raises(ValueError, match="decrease strictly"):
        euler(zero_field, x_t, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="reflect_steps"):
        zsampling(zero_field, zero_field, x_t, flow_sigmas(4), reflect_steps=5)

    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs()
    args = (model, noise, context, y, context_null, y_null)
    with pytest.raises(ValueError, match="takes w=None"):
        sample("euler", *args, w=3.0, steps=2)
    with pytest.raises(ValueError, match="needs the guidance w"):
        sample("cfg", *args, steps=2)
    with pytest.raises(ValueError, match="needs a weak model"):
        sample("w2sd", *args, w=3.0, steps=2)
    with pytest.raises(ValueError, match="null prompt"):
        sample("cfg", model, noise, context, y, w=3.0, steps=2)
    with pytest.raises(ValueError, match="does not match"):
        guided(model, (context, y), (context_null[:, :2], y_null), 3.0)


def test_student_computes_the_tokens_once_and_z_of_every_step_in_one_call():
    """sample("student") reads the student's tokens once (DICE's enhancer runs once, not per step) and
    computes z of all N steps in ONE call of the fusion's conditioning (Eq. 7's one code path), on N * B
    rows: N network calls, one conditioning."""
    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs(B=2)
    for name in ("teefusion", "dice"):
        fusion = embed.make_fusion(name, model.config)
        calls = {"student_context": [], "conditioning": []}
        for method in calls:
            original = getattr(fusion, method)
            setattr(fusion, method, lambda *a, _o=original, _c=calls[method]: _c.append(a) or _o(*a))
        x0, nfe = sample("student", model, noise, context, y, context_null, y_null, w=4.0, steps=5, fusion=fusion)
        assert len(calls["student_context"]) == 1 and nfe == 5, name
        assert len(calls["conditioning"]) == 1 and calls["conditioning"][0][2].shape == (5 * 2, y.shape[1]), name
    x_default, _ = sample("student", model, noise, context, y, y_null=y_null, w=4.0, steps=5)
    x_fusion, _ = sample("student", model, noise, context, y, y_null=y_null, w=4.0, steps=5,
                         fusion=embed.TeEFusion())
    assert torch.equal(x_default, x_fusion)
