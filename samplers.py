"""
The samplers of the TeEFusion paper on a flow model, with exact counts of network evaluations.

A flow model predicts the velocity v = eps - x0 of x_t = (1 - t) x0 + t eps, and a sampler
integrates dx/dt = v from pure noise (t = 1) to an image latent (t = 0). The paper compares
five ways of doing that (its Table 4); they differ in how many network evaluations (NFE)
each step costs, and that cost is what TeEFusion distills away:

    method      per step                                                NFE, N steps
    euler       x + h v(x, t)                  (the unguided teacher)   N
    cfg         Euler with Eq. 2, both branches in ONE batched call     2N
    zsampling   denoise w, invert w_inv, denoise w  (Eq. 3-4)           6(N-1) + 2
    w2sd        denoise strong, invert weak, move strong (Eq. 3-4)      6(N-1) + 2
    student     Euler on one pass with z from Eq. 7 (embed.py)          N

with h = t_next - t < 0. For N = 50 that is 296 for the reflection teachers against 50 for
the student: the paper's "6x". The reflection samplers reflect on every step but the last
(a plain guided Euler step), as both authors' releases do.

Reflection settings. Z-Sampling on a flow model defaults to its authors' own flow-matching
(SD3.5) code, `zigzag` in xie-lab-ml/CoRe, preset "flow": the inversion runs back over the step's
own interval with guidance w_inv = -0.5 (diffusers scale 0.5) at the time label tau = t - 1/N
(their max(0, t - 1000 // N) on the 1000 scale). Preset "sdxl" is their SDXL release (w_inv = -1,
the null branch alone, at tau = t). W2SD reflects over the same interval, its gap made by two
MODELS, as TeEFusion's Eq. 3-4 write it: x~_t = M_inv^w(M^s(x_t, t), t), the strong one denoising
at w (w_strong), the weak one inverting at w_weak = 0 (the W2SD release's weak guidance 1.0) with
the label t itself (W2SD_TAU; its release labels the inversion t too; CoRe's t - 1/N is Z-Sampling's
flow detail, available as tau="t-1/N"), and, by Eq. 4, x_{t-1} = M^s(x~_t, t): the STRONG model
makes the move after the reflection. The W2SD authors' SDXL LoRA release moves with a third, "main" model
instead (`main=`). Their release forms the pair from one fine-tune: with delta = finetuned -
base, strong = base + 1.5 delta, weak = base - 1.5 delta, main = base + 0.8 delta
(mmdit.load_mmdit_blend builds each, tensor by tensor).

A reflection teacher's w is not CFG's w. To first order in h, one Z-Sampling step at w moves
like a CFG step at w' = 2w - w_inv (`first_order_cfg_w`: 8.5 at w = 4 with the flow preset), so a
student distilled from it at w follows a stronger guidance than CFG at w would give.

Everything is written over a velocity function v(x, t) -> (B, ...), x (B, ...), t (B,), so
the samplers do not know about networks: `conditional`, `guided` and `student` build those
functions from a network `net(x, t, *cond)` (an MMDiT is one: cond = (context, y)), and an
`NFECounter` counts every row that goes through a network. `sample` runs any of the five on
an MMDiT and reports the NFE; `teacher_target` and `schedule_step` give distill.py its
per-batch target.

Guidance is the paper's w everywhere: CFG = (1 + w) v(c) - w v(null) (Eq. 2), so w = 0 is the
conditional model. diffusers' guidance_scale is g = 1 + w (`w_to_guidance_scale`).

    sigmas = flow_sigmas(50)                                    # SD3 schedule, shift 3
    v = guided(model, (context, y), (context_null, y_null), w=4.0)
    x0 = euler(v, torch.randn(1, 16, 128, 128), sigmas)
    x0, nfe = sample("w2sd", strong_model, noise, context, y, context_null, y_null, w=4.0,
                     weak=weak_model)                           # nfe == 296

Print a schedule:  python samplers.py --steps 28
Time the samplers: python benchmarks/bench_samplers.py
"""

import math

import torch
from tqdm import tqdm

import embed

METHODS = ("euler", "cfg", "zsampling", "w2sd", "student")
TEACHERS = ("cfg", "zsampling", "w2sd")
ALIASES = {"zigzag": "zsampling", "z-sampling": "zsampling", "euler+cfg": "cfg"}
TAUS = ("t", "t_next", "t-1/N")
TARGETS = ("step", "reflected")  # how one reflection teacher step becomes a velocity (teacher_target)
# The reflection's inversion settings, by the authors' code they come from (see the docstring):
# "flow", their flow-matching SD3.5 code, is the default on SD3; "sdxl" their SDXL release.
PRESETS = {"flow": dict(w_inv=-0.5, tau="t-1/N"), "sdxl": dict(w_inv=-1.0, tau="t")}
# W2SD's inversion label: Eq. 3, x~_t = M_inv^w(M^s(x_t, t), t), the weak model inverts at the SAME t
# (as the W2SD release does); the presets above are Z-Sampling's and do not set it
W2SD_TAU = "t"
W2SD_WEAK_W = 0.0  # the W2SD release's weak guidance: diffusers' scale 1.0 (the conditional model)


# -----------------------------------------------------------------------------
# The flow schedule (SPEC section 4: diffusers' FlowMatchEulerDiscreteScheduler, shift 3)


def shift_time(t, shift=3.0):
    """SD3's time shift s t / (1 + (s - 1) t): spends more of the steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps, shift=3.0):
    """The N + 1 flow times t_0 = 1 > t_1 > ... > t_{N-1} > t_N = 0 of an N-step sampler.

    Exactly FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N).sigmas: the N times
    are shift(linspace(1, sigma_min, N)) where sigma_min = shift(1/1000) is ALREADY shifted,
    so the smallest one is shifted twice; then a final 0. Returns (N + 1,) float32.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    # sigma_min = shift(1/1000), computed in float32 as the scheduler does at construction
    sigma_min = shift_time(torch.tensor(1 / 1000, dtype=torch.float32), shift).item()
    # linspace on the 1000-step timestep scale, in float64, as set_timesteps does
    ts = torch.linspace(1000.0, 1000.0 * sigma_min, steps, dtype=torch.float64) / 1000  # (N,)
    sigmas = shift_time(ts, shift).float()  # (N,) shifted a second time
    return torch.cat([sigmas, torch.zeros(1)])  # (N + 1,)


def check_sigmas(sigmas):
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 flow times, got shape {tuple(sigmas.shape)}")
    if not (torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[0] <= 1 and sigmas[-1] >= 0):
        raise ValueError(f"sigmas must decrease strictly inside [0, 1] (noise to data), got {sigmas.tolist()}")
    return sigmas


# -----------------------------------------------------------------------------
# Guidance values: the paper's w, and diffusers' g = 1 + w


def w_to_guidance_scale(w):
    """The paper's w (Eq. 2) -> diffusers' guidance_scale g, uncond + g (cond - uncond)."""
    return 1 + check_w(w)


def guidance_scale_to_w(g):
    """diffusers' guidance_scale g -> the paper's w = g - 1 (g >= 1)."""
    return check_w(g - 1, name="guidance_scale - 1")


def check_w(w, name="w", minimum=0.0):
    """Return w (a number or a (B,) tensor) unchanged after checking it is finite and >= minimum."""
    values = torch.as_tensor(w, dtype=torch.float64)
    if values.ndim > 1:
        raise ValueError(f"{name} must be a number or a (B,) tensor, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {w}")
    if (values < minimum).any():
        raise ValueError(f"{name} must be >= {minimum:g}, got {values.min().item():g} (the paper's guidance, Eq. 2: "
                         f"(1 + w) v_c - w v_null; diffusers' guidance_scale is g = 1 + w, see guidance_scale_to_w)")
    return w


# -----------------------------------------------------------------------------
# Counting network evaluations


class NFECounter:
    """Counts every row of every batch that goes through a network wrapped by `wrap`.

    One network evaluation (NFE) = one sample through the network once, so a CFG call on a
    batch of B, which sends 2B rows through in one forward, costs 2 NFE per sample.
    """

    def __init__(self):
        self.calls = 0  # forward calls
        self.rows = 0  # samples through a network, summed over calls

    def wrap(self, net):
        def counted(x, *args, **kwargs):
            self.calls += 1
            self.rows += x.shape[0]
            return net(x, *args, **kwargs)

        return counted

    def per_sample(self, batch_size):
        """NFE per sample of a run on a batch of batch_size."""
        if self.rows % batch_size:
            raise ValueError(f"{self.rows} rows do not divide into batches of {batch_size}")
        return self.rows // batch_size


def _counted(net, counter):
    return net if counter is None else counter.wrap(net)


def _per_sample(a, x):
    """A number stays a number; a (B,) tensor becomes (B, 1, ..., 1) to broadcast against x."""
    if not torch.is_tensor(a) or a.ndim == 0:
        return a
    return a.to(x.device).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


# -----------------------------------------------------------------------------
# Velocity functions v(x, t) built from a network net(x, t, *cond) -> (B, ...)


def conditional(net, cond, counter=None):
    """The conditional model alone: v(x, t) = net(x, t, *cond). 1 NFE per call."""
    forward = _counted(net, counter)

    def v(x, t):
        return forward(x, t, *cond)

    return v


def guided(net, cond, null, w, counter=None, min_w=0.0, name="w"):
    """Classifier-free guidance in the paper's convention (Eq. 2). 2 NFE per call.

    cond and null are tuples of tensors with the batch first; each null tensor may have batch
    1 (one null prompt for everybody). The conditional and null branches go through the
    network as ONE batched call of 2B rows. w is a number or a (B,) tensor (one w per sample).
    min_w is the smallest w accepted: 0, except for reflection's inversion (see `zsampling`),
    where it is -1 (g = 0, the null branch alone); name is the argument named in errors.
    """
    check_w(w, name, min_w)
    forward = _counted(net, counter)
    B = cond[0].shape[0]
    for c, n in zip(cond, null, strict=True):
        if n.shape[0] not in (1, B) or n.shape[1:] != c.shape[1:]:
            raise ValueError(f"a null conditioning tensor {tuple(n.shape)} does not match its conditional "
                             f"{tuple(c.shape)} (its batch must be 1 or {B})")
    cond_and_null = tuple(torch.cat([c, n.expand_as(c)]) for c, n in zip(cond, null))  # each (2B, ...)

    def v(x, t):
        v_c, v_null = forward(torch.cat([x, x]), torch.cat([t, t]), *cond_and_null).chunk(2)  # (B, ...) each
        w_ = _per_sample(w, x)
        # Eq. 2: (1 + w) v(x_t, t, c) - w v(x_t, t, null)
        return (1 + w_) * v_c - w_ * v_null

    return v


def student(model, context, y, y_null, w, counter=None, fusion=None, context_null=None):
    """The TeEFusion student: ONE forward per call on the conditional tokens, with the guidance
    w fused into the conditioning vector z (Eq. 7, embed.teefusion_conditioning, through
    fusion.conditioning); the null prompt enters only through its pooled vector y_null. 1 NFE per call.

    fusion: another student input from embed.FUSIONS (the Table 3 ablations "gonly" and
    "distillcfg", or the DICE baseline, whose tokens also read context_null: computed once here), or
    embed.TeEFusion(w_dtype) to form 1000 w as a bf16 pipeline does; still one forward.
    """
    check_w(w)
    fusion = embed.TeEFusion() if fusion is None else fusion
    forward = _counted(model, counter)
    y_null = y_null.expand_as(y)  # (B, Dy)
    context_s = fusion.student_context(model, context, context_null)  # (B, L, Dc)

    def v(x, t):
        z = fusion.conditioning(model, t, y, y_null, w)  # Eq. 7 (or the ablation's z), (B, D)
        return forward(x, t, context_s, y, vec=z)

    return v


def student_steps(model, context, y, y_null, w, times, counter=None, fusion=None, context_null=None):
    """`student` for a known schedule: one velocity function per step, times (N,) the flow time of
    each. z (Eq. 7) depends on t, the prompt and w only, never on x, so the conditioning of EVERY
    step is computed here at once: fusion.conditioning on the N * B rows (t repeated per image, y,
    y_null and w per step), then every adaLN output of the network (MMDiT.adaln), N * B rows through
    each layer in one matrix product instead of N matrix-vector products (at B = 1 those read the
    whole adaLN weights at every step). Each step is then one forward that only runs the blocks.
    Same NFE as `student`; memory: N * B * (12 depth + 2) * D floats (SD3-medium, 50 steps: 89 MB
    per image)."""
    check_w(w)
    fusion = embed.TeEFusion() if fusion is None else fusion
    forward = _counted(model, counter)
    N, B = len(times), y.shape[0]
    y_null = y_null.expand_as(y)  # (B, Dy)
    context_s = fusion.student_context(model, context, context_null)  # (B, L, Dc)
    times = torch.as_tensor(times, dtype=torch.float32, device=y.device)
    w_rows = embed.guidance_tensor(w, B, y.device).repeat(N)  # (N*B,)
    z = fusion.conditioning(model, times.repeat_interleave(B), y.repeat(N, 1), y_null.repeat(N, 1), w_rows)  # (N*B, D)
    adaln = [m.view(N, B, -1) for m in model.adaln(z)]  # each (N, B, n_mods * D)

    def step(i):
        mods = [m[i] for m in adaln]  # each (B, n_mods * D)
        return lambda x, t: forward(x, t, context_s, y, adaln=mods)

    return [step(i) for i in range(N)]


# -----------------------------------------------------------------------------
# One step: Euler, and reflection (Z-Sampling / W2SD)


def euler_step(v, x, t, t_next):
    """x_next = x + (t_next - t) v(x, t). t, t_next (B,)."""
    h = _per_sample(t_next - t, x)  # (B, 1, ..., 1), negative
    return x + h * v(x, t)


def sd35_tau_offset(steps):
    """The inversion label offset of the Z-Sampling authors' SD3.5 code: their inversion call gets
    the timestep t - 1000 // N on the 1000 scale, i.e. tau = t - (1000 // N) / 1000, which is 1/N
    rounded down to the scale's grid (0.02 for N = 50, 0.035 for N = 28)."""
    return (1000 // steps) / 1000


def check_tau(tau, steps=None):
    """tau is "t", "t_next", "t-1/N" (only where the number of steps N is known) or an offset >= 0."""
    if tau == "t-1/N":
        if steps is None:
            raise ValueError('tau="t-1/N" needs the number of sampling steps N; pass the offset as a '
                             "number instead, e.g. tau=sd35_tau_offset(N)")
        return sd35_tau_offset(steps)
    if isinstance(tau, str):
        if tau not in TAUS:
            raise ValueError(f"tau must be one of {TAUS} or an offset >= 0, got {tau!r}")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be one of {TAUS} or a finite offset >= 0, got {tau!r}")
    return float(tau)


def reflection_settings(preset="flow", w_inv=None, tau=None, kind="zsampling"):
    """(w_inv, tau) of a sampler: Z-Sampling's from a preset of PRESETS; W2SD's label is W2SD_TAU (Eq. 3)
    whatever the preset. Each is overridden when given explicitly."""
    if preset not in PRESETS:
        raise ValueError(f"unknown reflection preset {preset!r}; choose one of {sorted(PRESETS)}")
    default_tau = W2SD_TAU if kind == "w2sd" else PRESETS[preset]["tau"]
    return (PRESETS[preset]["w_inv"] if w_inv is None else w_inv), (default_tau if tau is None else tau)


def first_order_cfg_w(w, w_inv=PRESETS["flow"]["w_inv"]):
    """The CFG guidance a Z-Sampling step at w equals to first order in h: w' = 2w - w_inv.

    Expanding the three moves around x (all at t): x_next = x + h (2 v_w - v_inv) + O(h^2), and
    2 v_w - v_inv = 2((1 + w) v_c - w v_n) - ((1 + w_inv) v_c - w_inv v_n) = (1 + w') v_c - w' v_n.
    W2SD's step is 2 v_strong,w - v_weak,w_weak to the same order: a gap between two models, not a
    CFG scale (with strong = weak it is CFG at 2w - w_weak)."""
    return 2 * w - w_inv


def inversion_time(tau, t, t_next):
    """The time label the network is given for the inversion move (SPEC section 6).

    The authors' own code disagrees: their Z-Sampling release (SDXL, xie-lab-ml/Zigzag-Diffusion-
    Sampling) and their W2SD release (SDXL) call the network at t_i, the label of the step being
    reflected, as TeEFusion's Eq. 3 writes it for W2SD (the W2SD default here, W2SD_TAU); their SD3.5
    Z-Sampling (the `zigzag` pipeline in xie-lab-ml/CoRe) at t_i - 1/N, the Z-Sampling default here
    (PRESETS["flow"]). "t_next" is the time x' actually sits at. All three are O(h) apart; at N = 50
    near t = 1 the offset 1/N = 0.02 is about 3x the step (0.007).
    """
    if tau == "t":
        return t
    if tau == "t_next":
        return t_next
    return (t - tau).clamp(min=0)  # an offset


def reflection_step(v_denoise, v_invert, v_final, x, t, t_next, tau):
    """One reflection step from t to t_next (t, t_next (B,)); the paper's Eq. 3-4.

    Returns x_next, the step's effective velocity u (x_next = x + (t_next - t) u, with
    u = v_denoise(x) - v_invert(x') + v_final(x~): add the three moves below), v_denoise(x), and
    v_final(x~), the velocity of Eq. 4's move from the reflected point.
    u is what distillation regresses on; it needs no division by the small (t_next - t).
    tau: a checked label (see check_tau / inversion_time).
    """
    h = _per_sample(t_next - t, x)  # (B, 1, ..., 1), negative
    # Eq. 3, denoise: one step t -> t_next
    v1 = v_denoise(x, t)
    x_prime = x + h * v1
    # Eq. 3, invert: back from t_next to t along the inversion velocity (label tau)
    v2 = v_invert(x_prime, inversion_time(tau, t, t_next))
    x_tilde = x_prime - h * v2
    # Eq. 4: the step t -> t_next from the reflected point
    v3 = v_final(x_tilde, t)
    return x_tilde + h * v3, v1 - v2 + v3, v1, v3


# -----------------------------------------------------------------------------
# Samplers over a whole schedule (x: the noise at t = sigmas[0]; returns x at sigmas[-1])


def _latent(noise):
    # sample in at least float32: a bf16 latent cannot hold a step of h v for small h
    return noise.to(torch.promote_types(noise.dtype, torch.float32))


def _times(sigmas, i, x):
    B = x.shape[0]
    return sigmas[i].expand(B), sigmas[i + 1].expand(B)  # (B,), (B,)


def euler(v, noise, sigmas, progress=False):
    """Euler on dx/dt = v(x, t): the unguided teacher, Euler + CFG, or the student, by the v given.
    v: one velocity function, or a list of one per step (`student_steps`)."""
    sigmas = check_sigmas(sigmas).to(noise.device)
    if isinstance(v, list) and len(v) != len(sigmas) - 1:
        raise ValueError(f"{len(v)} velocity functions for a schedule of {len(sigmas) - 1} steps")
    x = _latent(noise)
    for i in tqdm(range(len(sigmas) - 1), desc="euler", disable=not progress):
        t, t_next = _times(sigmas, i, x)
        x = euler_step(v[i] if isinstance(v, list) else v, x, t, t_next)
    return x


def reflection_sampler(v_denoise, v_invert, v_final, noise, sigmas, reflect_steps=None, tau="t-1/N",
                       progress=False):
    """Reflection steps i < reflect_steps (the Z-Sampling paper's lambda; default N - 1, every step
    but the last), then plain Euler steps with v_final."""
    sigmas = check_sigmas(sigmas).to(noise.device)
    N = len(sigmas) - 1
    reflect_steps = N - 1 if reflect_steps is None else reflect_steps
    if isinstance(reflect_steps, bool) or not isinstance(reflect_steps, int) or not 0 <= reflect_steps <= N:
        raise ValueError(f"reflect_steps must be an integer in 0..{N} (the number of steps), got {reflect_steps!r}")
    tau = check_tau(tau, steps=N)
    x = _latent(noise)
    for i in tqdm(range(N), desc="reflection", disable=not progress):
        t, t_next = _times(sigmas, i, x)
        if i < reflect_steps:
            x = reflection_step(v_denoise, v_invert, v_final, x, t, t_next, tau)[0]
        else:
            x = euler_step(v_final, x, t, t_next)
    return x


def zsampling(v_guided, v_inverse, noise, sigmas, reflect_steps=None, tau="t-1/N", progress=False):
    """Z-Sampling (Bai et al., ICLR 2025): denoise with strong guidance, invert with weak guidance,
    denoise again. The guidance gap between the two moves pushes x toward the prompt.

    v_guided: `guided(..., w)`; v_inverse: `guided(..., w_inv, min_w=-1)`. The authors' releases
    invert with diffusers scale g = 0.5 (flow-matching SD3.5 code: w_inv = -0.5, the default) or
    g = 0 (SDXL: w_inv = -1, the null branch alone); both still run the two branches, 2 NFE.
    """
    return reflection_sampler(v_guided, v_inverse, v_guided, noise, sigmas, reflect_steps, tau, progress)


def w2sd(v_strong, v_weak, noise, sigmas, v_main=None, reflect_steps=None, tau=W2SD_TAU, progress=False):
    """W2SD (Bai et al., 2025): the same moves with a gap between two MODELS: denoise with the
    strong one, invert with the weak one, then (TeEFusion's Eq. 4) the step from the reflected
    point with the strong one again, or with v_main when given (the W2SD authors' SDXL LoRA
    release, which moves with a third "main" model). Any two checkpoints serve (TeEFusion used a
    CHATS pair; the W2SD release a fine-tune at +1.5 / -1.5, see mmdit.load_mmdit_blend)."""
    v_final = v_strong if v_main is None else v_main
    return reflection_sampler(v_strong, v_weak, v_final, noise, sigmas, reflect_steps, tau, progress)


# -----------------------------------------------------------------------------
# Algorithm 1's teacher target


def canonical(method, allowed):
    method = ALIASES.get(method, method)
    if method not in allowed:
        raise ValueError(f"unknown sampler {method!r}; expected one of {allowed} (or an alias in {sorted(ALIASES)})")
    return method


def schedule_step(t, steps, shift=3.0):
    """The step an N-step sampler on flow_sigmas(N, shift) takes from ANY flow time t in (0, 1].

    Returns (t_next, reflects), each (B,) like t. On the schedule's own times t_i it is exactly its
    step, t_i -> t_{i+1}, and reflects is False only at the last one (t_{N-1} -> 0), where the
    reflection samplers take a plain guided Euler step. Between the t_i it interpolates in the
    step index: the schedule is shift(u) of an evenly spaced u (spacing du), so t sits at the
    fractional index k = (1 - shift^-1(t)) / du, and t_next is the schedule at k + 1 (the evenly
    spaced u continued, and from t_{N-1} on a straight line down to 0). Distillation draws t from
    U(0, 1] and steps the teacher this way, so the target is the step the student will take.
    """
    t = torch.as_tensor(t)
    sigmas = flow_sigmas(steps, shift).to(device=t.device, dtype=torch.float64)  # (N + 1,)
    tf = t.double()
    if steps == 1:
        return torch.zeros_like(t), torch.zeros_like(t, dtype=torch.bool)
    u = tf / (shift - (shift - 1) * tf)  # shift^-1(t): the evenly spaced coordinate
    u_min = sigmas[-2] / (shift - (shift - 1) * sigmas[-2])  # shift^-1(t_{N-1})
    du = (1 - u_min) / (steps - 1)
    k = ((1 - u) / du).clamp(min=0)  # fractional step index of t
    k_next = k + 1
    on_grid = 1 - k_next * du  # the evenly spaced coordinate continued, for k + 1 <= N - 1
    t_next = torch.where(k_next <= steps - 1, shift * on_grid / (1 + (shift - 1) * on_grid),
                         sigmas[-2] * (steps - k_next).clamp(min=0))  # the last interval: straight to 0
    # exactly the schedule's own value where t is one of its times
    i = k.round().long().clamp(max=steps - 1)
    exact = (sigmas[i] - tf).abs() <= 1e-6 * sigmas[i].clamp(min=1e-3)
    t_next = torch.where(exact, sigmas[(i + 1).clamp(max=steps)], t_next)
    reflects = torch.where(exact, i < steps - 1, k < steps - 1)
    return t_next.to(t.dtype), reflects


@torch.no_grad()
def teacher_target(kind, net, x_t, t, t_next, cond, null, w, *, reflect=None, steps=None, preset="flow", w_inv=None,
                   tau=None, strong=None, weak=None, main=None, w_strong=None, w_weak=W2SD_WEAK_W, target="step",
                   counter=None):
    """The velocity the student regresses on at (x_t, t), from ONE teacher step to t_next.

    Algorithm 1 says "refine the target using Eq. 3 and 4" without saying how a three-move
    reflection becomes one velocity. Two readings (TARGETS):
      "step" (default): u = (x_next_teacher - x_t) / (t_next - t), the effective velocity of the
        whole teacher step, computed without the division (reflection_step). A student that matches
        u reproduces the teacher step exactly with ONE Euler step: x_t + (t_next - t) u = x_next_teacher.
      "reflected": the velocity of Eq. 4's move, the final model's guided velocity at the reflected
        point x~_t (M^s(x~_t, t)), regressed at x_t: the reflection moves where the teacher looks,
        and the student learns the guided velocity it finds there.
    For kind "cfg" both are the Eq. 2 velocity itself.

    x_t (B, ...); t, t_next (B,) with 0 <= t_next < t <= 1 (`schedule_step` gives the sampler's
    step); w a number or (B,) (per-sample guidance); cond/null as for `guided`. reflect: (B,) bool,
    False where the sampler takes a plain step (its last one): the target is then the final model's
    guided velocity. steps: the sampler's N, for tau "t-1/N". kind "zsampling" inverts with w_inv;
    kind "w2sd" denoises with `strong` (default: net) at w_strong (default w), inverts with `weak`
    at w_weak, and moves with the strong model at w (Eq. 4), or with `main` when given. preset,
    w_inv, tau: as for `sample`.
    """
    kind = canonical(kind, TEACHERS)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).expand(B)  # (B,)
    t_next = torch.as_tensor(t_next, device=x_t.device).expand(B)  # (B,)
    if not (torch.all(t_next < t) and torch.all(t_next >= 0) and torch.all(t <= 1)):
        raise ValueError("teacher_target needs 0 <= t_next < t <= 1 for every sample (a step toward the data)")
    if kind == "cfg":
        return guided(net, cond, null, w, counter)(x_t, t)  # one Euler + CFG step moves along exactly this velocity
    if kind == "w2sd" and weak is None:
        raise ValueError("the w2sd teacher needs a weak network (the strong one defaults to the teacher)")
    w_inv, tau = reflection_settings(preset, w_inv, tau, kind)
    tau = check_tau(tau, steps)
    if kind == "zsampling":
        v_denoise = v_final = guided(net, cond, null, w, counter)
        v_invert = guided(net, cond, null, w_inv, counter, min_w=-1.0, name="w_inv")
    else:
        strong = net if strong is None else strong
        v_denoise = guided(strong, cond, null, w if w_strong is None else w_strong, counter, name="w_strong")
        v_invert = guided(weak, cond, null, w_weak, counter, min_w=-1.0, name="w_weak")
        # Eq. 4: the strong model moves after the reflection (or the main model, as the W2SD release)
        same = main is None and w_strong is None
        v_final = v_denoise if same else guided(strong if main is None else main, cond, null, w, counter)
    _, u, v1, v3 = reflection_step(v_denoise, v_invert, v_final, x_t, t, t_next, tau)
    if target == "reflected":
        u = v3
    if reflect is None or bool(torch.as_tensor(reflect).all()):
        return u
    plain = v1 if v_final is v_denoise else v_final(x_t, t)  # the last step: no reflection
    keep = _per_sample(torch.as_tensor(reflect, device=x_t.device), x_t)  # (B, 1, ..., 1)
    return torch.where(keep, u, plain)


# -----------------------------------------------------------------------------
# The five samplers on an MMDiT, with their NFE


@torch.no_grad()
def sample(method, model, noise, context, y, context_null=None, y_null=None, *, w=None, steps=50, shift=3.0,
           reflect_steps=None, preset="flow", tau=None, w_inv=None, strong=None, weak=None, main=None,
           w_strong=None, w_weak=W2SD_WEAK_W, fusion=None, progress=False):
    """Generate latents with one of METHODS on an MMDiT (model(x, t, context, y, vec=None)).

    noise (B, C, H, W) at t = 1; context (B, L, Dc), y (B, Dy); the null prompt's context_null
    (1 or B, L, Dc) and y_null (1 or B, Dy) (or a negative prompt's). w: the paper's guidance
    (None for "euler", the unguided teacher).
    zsampling: preset ("flow": w_inv -0.5, tau "t-1/N"; "sdxl": w_inv -1, tau "t"), or w_inv and
    tau given explicitly; reflect_steps (default N - 1).
    w2sd: `model` is the strong model unless `strong` is given; weak (needed), w_strong (default
    w), w_weak (default 0), tau (default W2SD_TAU = "t", Eq. 3; the preset does not set it); main: a third model that makes the move after
    the reflection instead of the strong one (the W2SD SDXL LoRA release; TeEFusion's Eq. 4 uses
    the strong model, the default).
    student: fusion (see `student`).
    Returns (x0 (B, C, H, W), NFE per sample, counted).
    """
    method = canonical(method, METHODS)
    if (method == "euler") != (w is None):
        raise ValueError("euler is the unguided sampler and takes w=None" if method == "euler"
                         else f"{method} needs the guidance w (the paper's w, Eq. 2)")
    if method in ("cfg", "zsampling", "w2sd") and (context_null is None or y_null is None):
        raise ValueError(f"{method} needs the null prompt's context_null and y_null")
    if method == "student" and (y_null is None or (fusion is not None and fusion.reads_null_tokens
                                                   and context_null is None)):
        raise ValueError("student needs the null prompt's pooled vector y_null (Eq. 7), "
                         "and its context_null too with the DICE enhancer")
    if method == "w2sd" and weak is None:
        raise ValueError("w2sd needs a weak model (weak=...); the strong one is `model` unless strong= is given")
    w_inv, tau = reflection_settings(preset, w_inv, tau, method)
    sigmas = flow_sigmas(steps, shift)
    counter = NFECounter()
    cond, null = (context, y), (context_null, y_null)
    if method == "euler":
        x = euler(conditional(model, cond, counter), noise, sigmas, progress)
    elif method == "cfg":
        x = euler(guided(model, cond, null, w, counter), noise, sigmas, progress)
    elif method == "student":
        v = student_steps(model, context, y, y_null, w, sigmas[:-1], counter, fusion, context_null)
        x = euler(v, noise, sigmas, progress)
    elif method == "zsampling":
        v_inverse = guided(model, cond, null, w_inv, counter, min_w=-1.0, name="w_inv")
        x = zsampling(guided(model, cond, null, w, counter), v_inverse, noise, sigmas, reflect_steps, tau, progress)
    else:
        strong = model if strong is None else strong
        v_strong = guided(strong, cond, null, w if w_strong is None else w_strong, counter, name="w_strong")
        v_weak = guided(weak, cond, null, w_weak, counter, min_w=-1.0, name="w_weak")
        v_main = None
        if main is not None or w_strong is not None:  # the move after the reflection at the sampler's w
            v_main = guided(strong if main is None else main, cond, null, w, counter)
        x = w2sd(v_strong, v_weak, noise, sigmas, v_main, reflect_steps, tau, progress)
    return x, counter.per_sample(noise.shape[0])


def main(args):
    sigmas = flow_sigmas(args.steps, args.shift)
    print(f"flow_sigmas({args.steps}, shift={args.shift}): {len(sigmas)} times")
    print(" ".join(f"{s:.5f}" for s in sigmas.tolist()))


if __name__ == "__main__":
    from run import cli

    parser = cli.parser("Print the SD3 flow schedule.")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--shift", type=float, default=3.0)
    cli.run(main, parser)
