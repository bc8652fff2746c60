"""
Tests for samplers.py: the schedule against diffusers, the samplers against closed forms
(a Gaussian data distribution has an exact velocity field and an exact flow map), Eq. 2
against its definition, the NFE counts, and the teacher-target identity of Algorithm 1.

    python -m pytest -q tests/test_samplers.py
"""

import pytest
import torch

import embed
import samplers
from mmdit import CONFIGS, MMDiT
from samplers import (
    NFECounter, check_w, conditional, euler, flow_sigmas, guidance_scale_to_w, guided, reflection_step,
    sample, teacher_target, w2sd, w_to_guidance_scale, zsampling,
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
        x_tilde, _ = reflection_step(v, v, zero_field, x, t, t - h, label)
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
        ref = model(noise, t, context, y, vec=embed.teefusion_conditioning(model, t, y, y_null.expand_as(y), w))
    assert counter.calls == 1 and counter.per_sample(2) == 1  # one forward, conditional tokens only
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="w must be >= 0"):
        samplers.student(model, context, y, y_null, -1.0)
    _, nfe = sample("student", model, noise, context, y, y_null=y_null, w=5.0, steps=5)
    assert nfe == 5


def test_ablation_students_through_a_fusion_module():
    model = tiny_mmdit(0)
    noise, context, y, context_null, y_null = mmdit_inputs(B=2)
    t, w = torch.tensor([0.8, 0.4]), 3.0
    for name in ("teefusion", "gonly", "distillcfg", "dice"):
        fusion = embed.make_fusion(name, model.config)
        counter = NFECounter()
        with torch.no_grad():
            out = samplers.student(model, context, y, y_null, w, counter, fusion, context_null)(noise, t)
            c_s, y_s, vec = fusion(model, t, context, y, context_null, y_null.expand_as(y), w)
            assert torch.equal(out, model(noise, t, c_s, y_s, vec=vec)), name
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


def _one_teacher_step(kind, x, cond, null, t, t_next, w, nets, w_inv, w_weak):
    """One step of the full sampler, on one sample with a scalar w: the reference."""
    sigmas = torch.stack([t, t_next])  # a one-step schedule
    main = guided(nets["main"], cond, null, w)
    if kind == "cfg":
        return euler(main, x, sigmas)
    if kind == "zigzag":
        return zsampling(main, guided(nets["main"], cond, null, w_inv, min_w=-1.0), x, sigmas, reflect_steps=1)
    strong, weak = guided(nets["strong"], cond, null, w), guided(nets["weak"], cond, null, w_weak, min_w=-1.0)
    return w2sd(strong, weak, main, x, sigmas, reflect_steps=1)


@pytest.mark.parametrize("kind", ["cfg", "zigzag", "w2sd"])
def test_one_student_step_on_the_target_is_one_teacher_step(kind):
    x_t, cond, null, t, t_next, w, nets = _teacher_setup()
    w_inv, w_weak = -0.5, 0.5
    counter = NFECounter()
    u = teacher_target(kind, nets["main"], x_t, t, t_next, cond, null, w, w_inv=w_inv, w_weak=w_weak,
                       strong=nets["strong"], weak=nets["weak"], counter=counter)
    assert counter.per_sample(3) == (2 if kind == "cfg" else 6)
    x_student = x_t + (t_next - t).view(-1, 1, 1) * u  # one Euler step of a student that matches u
    for b in range(3):
        one = slice(b, b + 1)
        cond_b = tuple(c[one] for c in cond)
        x_teacher = _one_teacher_step(kind, x_t[one], cond_b, null, t[b], t_next[b], w[b].item(), nets, w_inv, w_weak)
        assert torch.allclose(x_student[one], x_teacher, rtol=0, atol=1e-12), (kind, b)


def test_teacher_target_on_mmdit_costs_one_teacher_step():
    model, strong, weak = tiny_mmdit(0), tiny_mmdit(1), tiny_mmdit(2)
    x_t, context, y, context_null, y_null = mmdit_inputs(B=2)
    t, t_next, w = torch.tensor([0.7, 0.3]), torch.tensor([0.68, 0.28]), torch.tensor([2.0, 14.0])
    for kind, nfe in (("cfg", 2), ("zsampling", 6), ("w2sd", 6)):
        counter = NFECounter()
        u = teacher_target(kind, model, x_t, t, t_next, (context, y), (context_null, y_null), w,
                           strong=strong, weak=weak, counter=counter)
        assert u.shape == x_t.shape and torch.isfinite(u).all() and not u.requires_grad
        assert counter.per_sample(2) == nfe and counter.calls == nfe // 2, kind  # every call batched


def test_reflection_targets_differ_from_cfg():
    x_t, cond, null, t, t_next, w, nets = _teacher_setup()
    kw = dict(strong=nets["strong"], weak=nets["weak"])
    u = {k: teacher_target(k, nets["main"], x_t, t, t_next, cond, null, w, **kw) for k in ("cfg", "zsampling", "w2sd")}
    assert not torch.allclose(u["cfg"], u["zsampling"]) and not torch.allclose(u["cfg"], u["w2sd"])


# -----------------------------------------------------------------------------
# Refused arguments


def test_refused_arguments():
    x_t, cond, null, t, t_next, w, nets = _teacher_setup()
    main = nets["main"]
    with pytest.raises(ValueError, match="t_next < t"):
        teacher_target("cfg", main, x_t, t_next, t, cond, null, w)
    with pytest.raises(ValueError, match="unknown sampler"):
        teacher_target("ddim", main, x_t, t, t_next, cond, null, w)
    with pytest.raises(ValueError, match="strong and a weak"):
        teacher_target("w2sd", main, x_t, t, t_next, cond, null, w)
    with pytest.raises(ValueError, match="needs the number of sampling steps"):
        teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, tau="t-1/N")
    for tau in ("t-1", -0.1):
        with pytest.raises(ValueError, match="tau"):
            teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, tau=tau)
    with pytest.raises(ValueError, match="w_inv must be >= -1"):
        teacher_target("zsampling", main, x_t, t, t_next, cond, null, w, w_inv=-1.5)
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
    with pytest.raises(ValueError, match="strong and a weak"):
        sample("w2sd", *args, w=3.0, steps=2)
    with pytest.raises(ValueError, match="null prompt"):
        sample("cfg", model, noise, context, y, w=3.0, steps=2)
    with pytest.raises(ValueError, match="does not match"):
        guided(model, (context, y), (context_null[:, :2], y_null), 3.0)
