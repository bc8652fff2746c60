"""
Tests for distill.py (Algorithm 1 as a DDP loop), on a tiny MMDiT and a small synthetic
dataset written in prepare.py's shard format, on CPU:
  - one optimizer step equals the MSE against the Eq. 2 target and torch's AdamW, by hand;
  - torchrun with 2 gloo processes: identical replicas, equal to one process with the same
    global batch;
  - stop at K and resume to 2K equals 2K in one go (losses and weights, bitwise); a half-written
    checkpoint (kill -9) is ignored;
  - the loss falls on a small problem; each refused argument, with its message;
  - faults at the command line (python distill.py): bad input and impossible resumes refused with
    one `error:` line before anything heavy; a broken `latest` falls back to the newest complete
    checkpoint; leftovers of a kill removed; pruning by completeness; non-finite weights never
    written; a corrupt shard named; one run per --out; torchrun's workers die with it.

    python -m pytest -q tests/test_distill.py
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from run import batches
from run import cli
import distill
import embed
from run import options
import samplers
from run import training_state
from mmdit import CONFIGS, MMDiT, load_mmdit, save_mmdit
from prepare import ShardDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = CONFIGS["tiny-sd3"]  # 4 latent channels, context 32, pooled 24
N, L, HW = 16, 6, 8  # samples, text tokens, latent size


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def make_teacher(path, seed=0):
    """A tiny MMDiT with every weight perturbed (a fresh one outputs zeros: adaLN-zero)."""
    torch.manual_seed(seed)
    model = MMDiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return save_mmdit(model, str(path))


def make_shards(folder, seed=0, poison=False):
    """N samples in prepare.py's layout: one shard, index.json, null.safetensors. The latents
    depend on the text, so guidance has something to amplify."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    y = torch.randn(N, CFG.pooled_dim, generator=g)  # (N, Dy)
    context = torch.randn(N, L, CFG.context_dim, generator=g)  # (N, L, Dc)
    latents = 0.5 * torch.randn(N, CFG.in_channels, HW, HW, generator=g) + y[:, :CFG.in_channels, None, None]
    if poison:
        latents[:] = float("nan")
    meta = {"num_samples": str(N), "captions": json.dumps([f"prompt {i}" for i in range(N)])}
    save_file({"latents": latents, "context": context, "y": y}, os.path.join(folder, "shard-00000.safetensors"), meta)
    save_file({"context": torch.zeros(1, L, CFG.context_dim), "y": torch.zeros(1, CFG.pooled_dim)},
              os.path.join(folder, "null.safetensors"))
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"settings": {"text": True}, "shards": [{"file": "shard-00000.safetensors", "num_samples": N}]}, f)
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return {"teacher": make_teacher(root / "teacher.safetensors"), "data": make_shards(root / "data"),
            "poison": make_shards(root / "poison", poison=True),
            "weak": make_teacher(root / "weak.safetensors", seed=1), "strong": make_teacher(root / "strong.safetensors",
                                                                                         seed=2)}


def args_for(world, out, *extra):
    """distill's arguments on the tiny world; an Euler + CFG teacher unless extra names another."""
    sampler = [] if "--teacher-sampler" in extra else ["--teacher-sampler", "cfg"]
    return options.parse_args(["--teacher", world["teacher"], "--data", world["data"], "--out", str(out),
                               "--no-progress", "--device", "cpu", *sampler, *extra])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    return load_file(path)


def assert_adam_close(a, b, lr, steps):
    """Weights after `steps` AdamW steps computed with the same math in another summation order.
    Adam divides by sqrt(v) + 1e-8: an entry whose gradient cancels to ~1e-8 moves by up to lr
    either way, decided by rounding. So: nearly every entry equal to 1e-6, every entry within
    the largest possible Adam move."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    print(f"weights: {diff.numel()} entries, max |diff| {diff.max():.2e}, "
          f"{(diff > 1e-6).float().mean():.2e} of them above 1e-6")
    assert (diff > 1e-6).float().mean() < 2e-3
    assert diff.max() <= 2 * lr * steps


# -----------------------------------------------------------------------------
# One step by hand


def test_one_step_equals_mse_against_the_cfg_target_and_adamw(world, tmp_path):
    args = args_for(world, tmp_path, "--steps", "1", "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3",
                    "--w-min", "2", "--w-max", "6")
    final = distill.main(args)

    # by hand, with no code from distill.py but its documented stream and draws
    data = ShardDataset(world["data"])
    context_null, y_null = data.null()
    sampler = batches.StepSampler(N, 0, 0, 1, 4, 4, 0, 1)
    x_t, ts, ws, cs, ys = [], [], [], [], []
    for p in range(4):
        item = data[sampler.index(p)]
        t, w, eps = distill.draw_t_w_eps(0, p, item["latents"].shape, "uniform", 2.0, 6.0)
        x_t.append((1 - t) * item["latents"] + t * eps)  # Algorithm 1
        ts.append(t), ws.append(w), cs.append(item["context"]), ys.append(item["y"])
    x_t, t, w = torch.stack(x_t), torch.stack(ts), torch.stack(ws)  # (4, C, H, W), (4,), (4,)
    context, y = torch.stack(cs), torch.stack(ys)
    teacher = load_mmdit(world["teacher"])
    with torch.no_grad():  # Eq. 2, two separate forwards
        v_c = teacher(x_t, t, context, y)
        v_null = teacher(x_t, t, context_null.expand_as(context), y_null.expand_as(y))
        target = (1 + w.view(-1, 1, 1, 1)) * v_c - w.view(-1, 1, 1, 1) * v_null
    student = load_mmdit(world["teacher"])
    z = embed.teefusion_conditioning(student, t, y, y_null.expand_as(y), w)  # Eq. 7
    loss = ((student(x_t, t, context, y, vec=z) - target) ** 2).mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    opt.step()

    logged = read_log(tmp_path)
    assert len(logged) == 1 and logged[0]["step"] == 1
    assert abs(logged[0]["loss"] - loss.item()) <= 1e-6 * loss.item()
    trained = load_mmdit(final).state_dict()
    checked = 0
    for k, v in student.state_dict().items():
        # Adam's first step is lr * g / (|g| + 1e-8): where |g| is near 1e-8 (a handful of entries that cancel),
        # summation order decides it, so those entries are only bounded by lr
        sure = grads[k].abs() > 1e-6 if k in grads else torch.ones_like(v, dtype=torch.bool)
        torch.testing.assert_close(trained[k][sure], v[sure], rtol=1e-5, atol=1e-6)
        assert (trained[k] - v).abs().max() <= 2e-3 + 1e-6
        checked += sure.sum().item()
    assert checked > 0.9 * sum(v.numel() for v in trained.values())
    assert not torch.equal(trained["final_layer.linear.weight"], teacher.state_dict()["final_layer.linear.weight"])


def first_batch(world, B, w_min, w_max):
    """The first global batch of the documented stream: x_t, t, w, context, y, and the null prompt."""
    data = ShardDataset(world["data"])
    sampler = batches.StepSampler(N, 0, 0, 1, B, B, 0, 1)
    rows = []
    for p in range(B):
        item = data[sampler.index(p)]
        t, w, eps = distill.draw_t_w_eps(0, p, item["latents"].shape, "uniform", w_min, w_max)
        rows.append((item["latents"], eps, t, w, item["context"], item["y"]))
    x0, eps, t, w, context, y = (torch.stack(c) for c in zip(*rows))
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps  # Algorithm 1
    return x_t, t, w, context, y, data.null()


def target_by_hand(kind, nets, x_t, t, w, context, y, null, N=50, final="strong", target="step"):
    """Algorithm 1's target written from the paper's equations, in float64, with two separate
    forwards per guided velocity (Eq. 2): "cfg" is Eq. 2 itself; the reflection teachers take the
    sampler's step t -> t_next (samplers.schedule_step, pinned in test_samplers) in three moves
    (Eq. 3-4): Z-Sampling with its authors' flow-matching settings (it inverts at w_inv = -0.5 with
    the label max(0, t - 20 / 1000) for N = 50), W2SD as Eq. 3 writes it (the weak model at w = 0
    inverts AT t); Eq. 4: the strong model moves, or the main one. The target is (x_next - x_t) /
    (t_next - t) (target "step") or Eq. 4's velocity at the reflected point ("reflected"); a plain
    step where the sampler does not reflect."""
    context_null, y_null = (n.double().expand_as(c) for n, c in zip(null, (context, y)))
    context, y, x_t, w = context.double(), y.double(), x_t.double(), w.double().view(-1, 1, 1, 1)

    def cfg(net, x, s, scale):  # Eq. 2: (1 + w) v(c) - w v(null)
        return (1 + scale) * net(x, s, context, y) - scale * net(x, s, context_null, y_null)

    if kind == "cfg":
        return cfg(nets["teacher"], x_t, t, w)
    t_next, reflect = samplers.schedule_step(t, N)
    h = (t_next - t).double().view(-1, 1, 1, 1)
    if kind == "zsampling":
        moves = [(nets["teacher"], w), (nets["teacher"], torch.full_like(w, -0.5)), (nets["teacher"], w)]
    else:
        moves = [(nets["strong"], w), (nets["weak"], torch.zeros_like(w)), (nets[final], w)]
    x1 = x_t + h * cfg(*moves[0][:1], x_t, t, moves[0][1])  # Eq. 3, denoise
    label = t if kind == "w2sd" else (t - 0.02).clamp(min=0)  # Eq. 3's t for W2SD; CoRe's for Z-Sampling
    x2 = x1 - h * cfg(moves[1][0], x1, label, moves[1][1])  # Eq. 3, invert
    v3 = cfg(moves[2][0], x2, t, moves[2][1])  # Eq. 4
    x3 = x2 + h * v3
    plain = cfg(moves[2][0], x_t, t, w)
    return torch.where(reflect.view(-1, 1, 1, 1), (x3 - x_t) / h if target == "step" else v3, plain)


def doubled(path_or_model):
    model = load_mmdit(path_or_model) if isinstance(path_or_model, str) else path_or_model
    return model.double().requires_grad_(False)


@pytest.mark.parametrize("method, sampler, extra", [
    ("teefusion", "zsampling", []), ("teefusion", "w2sd", []), ("teefusion", "w2sd", ["--target", "reflected"]),
    ("teefusion", "cfg", ["--fused-scale", "0.25"]), ("gonly", "cfg", []), ("gonly-scaled", "w2sd", []),
    ("distillcfg", "cfg", []), ("dice", None, [])])
def test_first_loss_of_every_method_and_teacher(world, tmp_path, method, sampler, extra):
    """The first step's loss against the target written by hand from the paper's equations (see
    target_by_hand; W2SD with the --weak pair and --teacher as its strong model, Eq. 4) and each
    method's student input by hand: Eq. 7 (at 1/256, or --fused-scale), G only (the paper's unscaled
    row, and at Eq. 7's scale), DistillCFG's new MLP and DICE's enhancer with the default
    initialisation drawn from --seed. DICE learns from an Euler + CFG teacher by default (its paper's
    CFG supervision) and trains its enhancer alone, at w = 4 only: the MMDiT must come out unchanged."""
    extra = list(extra) + (["--weak", world["weak"]] if sampler == "w2sd" else [])
    lr = [] if method == "dice" else ["--lr", "1e-3"]
    chosen = ["--teacher-sampler", sampler] if sampler else []
    args = args_for(world, tmp_path, "--steps", "1", "--global-batch", "2", *lr, "--method", method, *chosen, *extra)
    final = distill.main(args)
    if method == "dice":
        assert args.w_min == args.w_max == 4.0 and args.lr == 2e-4  # DICE's own settings
        assert args.teacher_sampler == "cfg"  # and its own teacher: CFG at that one scale (DICE Sec. 3.1)
    x_t, t, w, context, y, null = first_batch(world, 2, args.w_min, args.w_max)
    nets = {"teacher": doubled(world["teacher"]), "weak": doubled(world["weak"])}
    nets["strong"] = nets["teacher"]
    target = target_by_hand(args.teacher_sampler, nets, x_t, t, w, context, y, null, target=args.target)
    scale = 0.25 if "--fused-scale" in extra else 1 / 256
    teacher = load_mmdit(world["teacher"])
    torch.manual_seed(0)  # distill draws the new modules' initialisation from --seed
    fusion = embed.make_fusion(method, teacher.config)
    context_null, y_null = null
    with torch.no_grad():
        c = embed.sd3_conditioning(teacher, t, y)
        G_w = teacher.t_embedder(embed.timestep_embedding(w))
        if method == "gonly":  # the paper's row: G(psi(w)) at full scale
            v = teacher(x_t, t, context, y, vec=c + G_w)
        elif method == "gonly-scaled":
            v = teacher(x_t, t, context, y, vec=c + G_w / 256)
        elif method == "teefusion":
            v = teacher(x_t, t, context, y, vec=c + G_w * teacher.y_embedder(y - y_null) * scale)
        elif method == "distillcfg":
            v = teacher(x_t, t, context, y, vec=c + fusion.guidance_in(embed.timestep_embedding(w)))
        else:
            refined = context + fusion.tokens(context, context_null)
            refined[:, 0] = context[:, 0]
            v = teacher(x_t, t, refined, y)
    loss = ((v.double() - target) ** 2).mean().item()
    assert abs(read_log(tmp_path)[0]["loss"] - loss) <= 2e-5 * loss
    trained = load_mmdit(final).state_dict()
    unchanged = all(torch.equal(v, trained[k]) for k, v in teacher.state_dict().items())
    assert unchanged == (method == "dice")
    if method in ("distillcfg", "dice"):
        moved = load_file(tmp_path / "fusion.safetensors")
        last = "guidance_in.mlp.2.weight" if method == "distillcfg" else "tokens.fc2.weight"
        assert not torch.equal(moved[last], dict(fusion.named_parameters())[last])  # trained


@pytest.mark.parametrize("final", ["strong", "main"])
def test_w2sd_pair_from_a_fine_tune_and_the_students_start(world, tmp_path, final):
    """--w2sd-finetuned F: strong = teacher + 1.5 (F - teacher), weak = teacher - 1.5 (F - teacher),
    main = teacher + 0.8 (F - teacher), and the first loss against the target by hand from those
    blends; the student starts from the model that moves after the reflection (Eq. 4: strong)."""
    args = args_for(world, tmp_path, "--steps", "1", "--global-batch", "2", "--lr", "1e-3", "--teacher-sampler",
                    "w2sd", "--w2sd-finetuned", world["strong"], "--w2sd-final", final)
    distill.main(args)
    base, tuned = load_mmdit(world["teacher"]).state_dict(), load_mmdit(world["strong"]).state_dict()

    def blend(scale):
        model = load_mmdit(world["teacher"])
        model.load_state_dict({k: base[k] + scale * (tuned[k] - base[k]) for k in base})
        return model

    nets = {"strong": doubled(blend(1.5)), "weak": doubled(blend(-1.5)), "main": doubled(blend(0.8))}
    x_t, t, w, context, y, null = first_batch(world, 2, args.w_min, args.w_max)
    target = target_by_hand("w2sd", nets, x_t, t, w, context, y, null, final=final)
    start = nets[final]
    with torch.no_grad():
        z = embed.teefusion_conditioning(start, t.double(), y.double(), null[1].double(), w)
        v = start(x_t.double(), t.double(), context.double(), y.double(), vec=z)
    loss = ((v - target) ** 2).mean().item()
    assert abs(read_log(tmp_path)[0]["loss"] - loss) <= 2e-5 * loss


def test_checkpointing_is_exact_and_bf16_is_close(world, tmp_path):
    """--grad-checkpointing recomputes the same numbers; --bf16 autocast with a bf16 teacher (the
    CUDA setting, here on CPU) trains the same first step within bf16 rounding."""
    common = ["--steps", "1", "--global-batch", "4", "--lr", "1e-3"]
    ref = distill.main(args_for(world, tmp_path / "ref", *common))
    ckpt = distill.main(args_for(world, tmp_path / "ckpt", *common, "--grad-checkpointing"))
    bf16 = distill.main(args_for(world, tmp_path / "bf16", *common, "--bf16", "--teacher-dtype", "bf16"))
    loss = read_log(tmp_path / "ref")[0]["loss"]
    assert read_log(tmp_path / "ckpt")[0]["loss"] == loss
    assert_adam_close(weights(ckpt), weights(ref), lr=1e-3, steps=1)
    assert abs(read_log(tmp_path / "bf16")[0]["loss"] - loss) < 0.03 * loss
    assert all(v.dtype == torch.float32 for v in weights(bf16).values())  # fp32 master weights


# -----------------------------------------------------------------------------
# torchrun: two gloo processes equal one process


def torchrun_distill(argv, timeout=240):
    """distill.py under torchrun, 2 gloo ranks on the CPU, in a process group of its own, so that a timeout
    kills the launcher AND its workers (no orphans); fails with the run's output unless it succeeds."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "distill.py", *argv], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def test_torchrun_two_ranks_equal_one_process(world, tmp_path):
    """2 ranks x micro-batch 1 x 2 accumulation rounds for 3 steps, then a resume on ONE process
    to step 4, against one process with micro-batch 4 for 4 steps. distillcfg with EMA: the model,
    its new guidance MLP (initialised alike whatever the world size) and the EMA of both."""
    common = ["--teacher", world["teacher"], "--data", world["data"], "--global-batch", "4", "--method", "distillcfg",
              "--ema", "0.9", "--lr", "1e-3", "--no-progress", "--device", "cpu", "--ckpt-every", "1", "--keep", "4",
              "--teacher-sampler", "cfg"]
    two = tmp_path / "two"
    torchrun_distill([*common, "--steps", "3", "--micro-batch", "1", "--out", str(two)])
    one = tmp_path / "one"
    distill.main(options.parse_args([*common, "--steps", "4", "--micro-batch", "4", "--out", str(one)]))

    for step in (1, 2, 3):  # the two ranks agree bitwise at every checkpoint
        with open(two / "checkpoints" / f"step-{step:07d}" / "state.json") as f:
            replicas = json.load(f)["replica_checksums"]
        assert len(replicas) == 2 and replicas[0] == replicas[1]
    a = weights(two / "student.safetensors")
    b = weights(one / "checkpoints" / "step-0000003" / "student.safetensors")
    assert_adam_close(a, b, lr=1e-3, steps=3)
    # world size 2 -> 1: the resumed run continues the same stream
    distill.main(options.parse_args([*common, "--steps", "4", "--micro-batch", "2", "--out", str(two), "--resume"]))
    for name in ("student.safetensors", "fusion.safetensors", "student-ema.safetensors", "fusion-ema.safetensors"):
        assert_adam_close(weights(two / name), weights(one / name), lr=1e-3, steps=4)
    la, lb = [r["loss"] for r in read_log(two)], [r["loss"] for r in read_log(one)]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)


# -----------------------------------------------------------------------------
# Stop and resume


def test_resume_equals_one_go_and_survives_a_half_written_checkpoint(world, tmp_path):
    common = ["--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--ckpt-every", "2", "--ema", "0.9",
              "--method", "distillcfg"]  # distillcfg: model + its own module, with EMA: every kind of state
    distill.main(args_for(world, tmp_path / "whole", *common, "--steps", "4"))
    part = tmp_path / "part"
    distill.main(args_for(world, part, *common, "--steps", "2"))
    # a kill -9 in the middle of writing the next checkpoint: a folder, a truncated file, no pointer
    broken = part / "checkpoints" / "step-0000003"
    broken.mkdir()
    (broken / "student.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="pass --resume"):
        distill.main(args_for(world, part, *common, "--steps", "4"))
    distill.main(args_for(world, part, *common, "--steps", "4", "--resume"))

    assert [r["step"] for r in read_log(part)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_log(part)] == [r["loss"] for r in read_log(tmp_path / "whole")]
    for name in ("student.safetensors", "fusion.safetensors", "student-ema.safetensors", "fusion-ema.safetensors"):
        a, b = weights(part / name), weights(tmp_path / "whole" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_kill_9_leaves_a_loadable_checkpoint(world, tmp_path):
    """SIGKILL a run that checkpoints every step, at some moment after its first checkpoint: what
    `latest` points to loads (student, optimizer, state), and --resume carries on from it."""
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "distill.py", "--teacher", world["teacher"], "--data", world["data"], "--out", str(out),
           "--steps", "100000", "--global-batch", "2", "--ckpt-every", "1", "--no-progress", "--device", "cpu",
           "--teacher-sampler", "cfg"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while training_state.latest_checkpoint(str(out)) is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.37)  # somewhere in the middle of later steps and checkpoint writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = training_state.latest_checkpoint(str(out))
    assert folder is not None
    with open(os.path.join(folder, "state.json")) as f:
        step = json.load(f)["step"]
    load_mmdit(os.path.join(folder, "student.safetensors"))
    load_file(os.path.join(folder, "optimizer.safetensors"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 99999, "lo')  # a log line cut short by the kill
    args = args_for(world, out, "--global-batch", "2", "--ckpt-every", "1", "--steps", str(step + 2), "--resume")
    distill.main(args)
    assert [r["step"] for r in read_log(out)] == list(range(1, step + 3))


# -----------------------------------------------------------------------------
# Learning


def test_loss_falls_within_a_few_hundred_steps(world, tmp_path):
    # the student starts as the teacher's conditional branch: its first losses are w^2 |v_c - v_null|^2
    args = args_for(world, tmp_path, "--steps", "300", "--global-batch", "16", "--lr", "1e-3", "--w-min", "1",
                    "--w-max", "4", "--ckpt-every", "1000")
    distill.main(args)
    losses = [r["loss"] for r in read_log(tmp_path)]
    first, last = sum(losses[:10]) / 10, sum(losses[-50:]) / 50
    print(f"loss: first 10 steps {first:.4f}, last 50 steps {last:.4f}")
    assert last < 0.65 * first


def test_export_diffusers_and_draws(world, tmp_path):
    """--export-diffusers: a diffusers transformer folder with the released pipeline's flag, holding
    exactly the student's weights. The draws: t in (0, 1] (uniform, or SD3's logit-normal), w in
    [w_min, w_max], and the same for the same (seed, position)."""
    final = distill.main(args_for(world, tmp_path, "--steps", "1", "--global-batch", "2", "--export-diffusers"))
    folder = tmp_path / "diffusers" / "transformer"
    with open(folder / "config.json") as f:
        assert json.load(f)["txt_align_guidance"] is True
    exported, student = load_mmdit(str(folder)).state_dict(), load_mmdit(final).state_dict()
    assert all(torch.equal(exported[k], student[k]) for k in student)

    # P(0.25 < t < 0.75): 0.5 for uniform, P(|N(0, 1)| < ln 3) = 0.728 for logit-normal
    for sampling, middle in (("uniform", 0.5), ("logit-normal", 0.728)):
        t, w = (torch.stack(v) for v in zip(*[distill.draw_t_w_eps(3, p, (1,), sampling, 2.0, 14.0)[:2] for p in range(2000)]))
        assert (t > 0).all() and (t <= 1).all() and (w >= 2).all() and (w <= 14).all()
        assert abs(t.mean() - 0.5) < 0.03 and abs(w.mean() - 8) < 0.3
        assert abs(((t > 0.25) & (t < 0.75)).float().mean() - middle) < 0.04
    a, b = distill.draw_t_w_eps(5, 17, (2, 3), "uniform", 0.0, 1.0), distill.draw_t_w_eps(5, 17, (2, 3), "uniform", 0.0, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -----------------------------------------------------------------------------
# Guards


@pytest.mark.parametrize("extra, world_size, message", [
    (["--w-min", "8", "--w-max", "4"], 1, "--w-min 8 is larger than --w-max 4"),
    (["--w-min", "-1"], 1, "must be >= 0"),
    (["--global-batch", "6", "--micro-batch", "4"], 1, "not divisible by world size 1 x --micro-batch 4"),
    (["--global-batch", "8", "--micro-batch", "3"], 2, "not divisible by world size 2 x --micro-batch 3"),
    (["--teacher-sampler", "w2sd"], 1, "w2sd needs a weak model: --weak PATH"),
    (["--teacher-sampler", "w2sd", "--strong", "S"], 1, "w2sd needs a weak model: --weak PATH"),
    (["--weak", "W"], 1, "need --teacher-sampler w2sd"),
    (["--teacher-sampler", "w2sd", "--w2sd-finetuned", "F", "--weak", "W"], 1, "leave --strong and --weak out"),
    (["--method", "dice", "--w-min", "2", "--w-max", "14"], 1, "dice is trained at ONE guidance"),
    (["--preset", "flow", "--tau", "t-2"], 1, "tau must be one of"),
    (["--method", "dice", "--export-diffusers"], 1, "only fits --method teefusion"),
    (["--ema", "1.5"], 1, "decay must be in"),
    (["--method", "distillcfg", "--fused-scale", "0.25"], 1, "applies to --method teefusion or gonly-scaled"),
    (["--fused-scale", "0"], 1, "--fused-scale 0: must be > 0, a finite number"),
    (["--fused-scale", "nan"], 1, "--fused-scale nan: must be > 0, a finite number"),
    (["--fused-scale", "0.25", "--export-diffusers"], 1, "computes Eq. 7 at 1/256"),
])
def test_refused_arguments(world, tmp_path, extra, world_size, message):
    with pytest.raises(ValueError, match=message.replace("-", r"\-").replace("+", r"\+")):
        options.check_args(args_for(world, tmp_path, *extra), world_size)


def test_missing_teacher_is_refused(world, tmp_path):
    args = options.parse_args(["--teacher", str(tmp_path / "nope.safetensors"), "--data", world["data"]])
    with pytest.raises(FileNotFoundError, match="--teacher .*nope.safetensors: no such file"):
        options.check_args(args)


def test_full_is_refused_with_a_real_teacher_and_with_a_chosen_method(world, tmp_path):
    with pytest.raises(ValueError, match=r"\-\-full .* cannot run with \-\-teacher \(real SD3\)"):
        options.check_args(args_for(world, tmp_path, "--full"))
    with pytest.raises(ValueError, match=r"cannot run with \-\-teacher"):  # before any work
        distill.main(args_for(world, tmp_path, "--full"))
    assert not os.listdir(tmp_path)
    for extra in (["--method", "dice"], ["--teacher-sampler", "cfg"]):
        with pytest.raises(ValueError, match=r"leave \-\-method and \-\-teacher\-sampler out"):
            options.check_args(options.parse_args(["--full", *extra]))
    with pytest.raises(ValueError, match="not torchrun"):
        options.check_args(options.parse_args(["--full"]), world_size=2)


def test_full_runs_every_student_into_its_own_folder(tmp_path):
    out, runs = options.full_runs(options.parse_args(["--full", "--out", str(tmp_path), "--steps", "7"]))
    assert out == str(tmp_path)
    assert [(r.method, r.teacher_sampler) for r in runs] == [
        ("teefusion", "cfg"), ("teefusion", "zsampling"), ("teefusion", "w2sd"), ("gonly", "w2sd"),
        ("gonly-scaled", "w2sd"), ("distillcfg", "w2sd"), ("dice", "cfg")]  # DICE <- Euler + CFG, as its paper
    assert len({r.out for r in runs}) == len(runs) and all(os.path.dirname(r.out) == str(tmp_path) for r in runs)
    assert all(r.steps == 7 and r.no_report and not r.full for r in runs)
    assert [r.lr for r in runs] == [options.TOY_DEFAULTS["lr"]] * 6 + [2e-4]  # DICE's own learning rate
    scales = [r.fused_scale for r in runs]  # Eq. 7's scale only where the method has one, the same for all
    assert scales == [options.TOY_DEFAULTS["fused_scale"]] * 3 + [None, options.TOY_DEFAULTS["fused_scale"], None, None]
    assert options.full_runs(options.parse_args(["--full"]))[0] == "runs/full"
    # the default command is unchanged: one TeEFusion student from the W2SD + CFG teacher into runs/toy
    args = options.fill_defaults(options.parse_args([]))
    assert (args.method, args.teacher_sampler, args.out, args.steps) == ("teefusion", "w2sd", "runs/toy", 1500)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    common = ["--global-batch", "4", "--lr", "1e-3", "--ckpt-every", "2"]
    distill.main(args_for(world, tmp_path, *common, "--steps", "2"))
    good = load_file(tmp_path / "checkpoints" / "step-0000002" / "student.safetensors")
    args = args_for(world, tmp_path, *common, "--steps", "4", "--resume")
    args.data = world["poison"]
    with pytest.raises(distill.NonFinite, match="non-finite loss .* at step 3.*finite weights is .*step-0000002"):
        distill.main(args)
    assert training_state.latest_checkpoint(str(tmp_path)).endswith("step-0000002")
    kept = load_file(tmp_path / "checkpoints" / "step-0000002" / "student.safetensors")
    assert all(torch.equal(kept[k], good[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in load_mmdit(str(tmp_path / "checkpoints" / "step-0000002" /
                                                               "student.safetensors")).state_dict().values())


# -----------------------------------------------------------------------------
# Faults and bad input at the command line: one `error:` line naming the thing, its exit status,
# and nothing new, half-written or non-finite in --out


def distill_cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "distill.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def tiny_argv(world, out, *extra, data=None):
    return ["--teacher", world["teacher"], "--data", data or world["data"], "--out", str(out), "--no-progress",
            "--device", "cpu", "--teacher-sampler", "cfg", "--global-batch", "2", *extra]


def one_error(result, status, *names):
    """The command exited with `status` after ONE stderr line `error: ...` naming every one of names."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1 and lines[0].startswith("error: "), \
        (result.returncode, result.stderr[-3000:])
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def listing(out):
    """Every file under out with its size and modification time."""
    return {os.path.relpath(os.path.join(d, f), out): (os.stat(os.path.join(d, f)).st_size,
                                                       os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(out) for f in files}


def assert_sound(out):
    """No temporary file, no lock left behind, and every safetensors file under out finite."""
    names = listing(out)
    assert not [n for n in names if training_state.TEMPORARY.search(n) or n.endswith("run.lock")], names
    for name in names:
        if name.endswith(".safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(os.path.join(out, name)).values()), name


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished 3-step run with a complete checkpoint at every step (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    distill.main(args_for(world, out, "--steps", "3", "--global-batch", "2", "--ckpt-every", "1", "--keep", "3"))
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def unwritable(tmp_path):
    """A folder this process cannot create: under a read-only folder, or for root (who writes anywhere
    else) in sysfs."""
    if os.geteuid() == 0:
        return "/sys/teefusion-test-out"
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "out")


def bad_input(world, tmp, case):
    """A command line that must be refused before any network loads: (argv, --out, the names its one
    error line must hold)."""
    out, data, teacher, extra = tmp / "out", world["data"], world["teacher"], []
    if case == "w-min":
        extra, names = ["--w-min", "9", "--w-max", "3"], ["--w-min 9 is larger than --w-max 3"]
    elif case == "steps-0":
        extra, names = ["--steps", "0"], ["--steps 0", "nothing to train"]
    elif case == "out-is-a-file":
        out.write_text("not a folder")
        names = [f"--out {out} is a file"]
    elif case == "out-unwritable":
        out = unwritable(tmp)
        names = [f"--out {out}"]
    elif case == "no-data":
        data, names = str(tmp / "nowhere"), ["--data", "nowhere: no such folder"]
    elif case == "no-index":
        (tmp / "empty").mkdir()
        data, names = str(tmp / "empty"), ["no index.json in", "empty"]
    elif case == "corrupt-index":
        (tmp / "bad").mkdir()
        (tmp / "bad" / "index.json").write_text('{"shards": [')
        data, names = str(tmp / "bad"), [os.path.join(tmp / "bad", "index.json"), "is corrupt"]
    elif case == "missing-shard":
        make_shards(tmp / "bad")
        os.remove(tmp / "bad" / "shard-00000.safetensors")
        data, names = str(tmp / "bad"), ["index.json lists 1 file(s) missing", "shard-00000.safetensors"]
    else:  # a pickle teacher: refused by the loader, after --out is locked, before anything is written
        teacher = str(tmp / "teacher.ckpt")
        shutil.copy(world["teacher"], teacher)
        names = ["teacher.ckpt", "refusing a pickle checkpoint"]
    argv = tiny_argv(world, out, "--steps", "2", *extra, data=data)
    argv[argv.index("--teacher") + 1] = teacher
    return argv, out, names


BAD_INPUT = ["w-min", "steps-0", "out-is-a-file", "out-unwritable", "no-data", "no-index", "corrupt-index",
             "missing-shard", "pickle-teacher"]


def break_latest(out, how):
    root = out / "checkpoints"
    if how == "corrupt-latest":
        (root / "latest").write_text('{"checkpoint": "step-00')
    elif how == "missing-folder":
        shutil.rmtree(root / "step-0000003")
    elif how == "incomplete-folder":
        os.remove(root / "step-0000003" / "state.json")
    elif how == "truncated-file":
        with open(root / "step-0000003" / "student.safetensors", "r+b") as f:
            f.truncate(100)
    elif how == "corrupt-state":
        (root / "step-0000003" / "state.json").write_text("{")


def poison_file(path):
    """Overwrite the first tensor of a safetensors file with NaN: the same size, so complete by
    state.json's listing, and non-finite in content."""
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[next(iter(tensors))].fill_(float("nan"))
    save_file(tensors, str(path), meta)


RESUME = {
    "steps-below": ["--steps 1 is below the step of the checkpoint to resume, 3", "step-0000003"],
    "no-resume": ["already holds checkpoints", "pass --resume"],
    "corrupt-latest": ["checkpoints/latest is corrupt", "no complete checkpoint to fall back to"],
    "missing-folder": ["latest points at", "step-0000003, which does not exist"],
    "corrupt-state": ["step-0000003, which has a corrupt state.json"],
    "non-finite-weights": ["step-0000003 holds non-finite weights", "student"],
    "changed-seed": ["trained with --seed 0, not 1", "keeps the settings"],
    "changed-lr": ["trained with --lr", "not 0.5", "keeps the settings"],
    "changed-teacher-steps": ["trained with --teacher-steps", "not 7", "keeps the settings"],
}
CHANGED = {"changed-seed": ["--seed", "1"], "changed-lr": ["--lr", "0.5"], "changed-teacher-steps": ["--teacher-steps", "7"]}


def bad_resume(world, finished, tmp, case):
    """A copy of the finished run, and a command line that cannot continue it: (argv, --out, names)."""
    out = copy_of(finished, tmp)
    steps = {"steps-below": "1"}.get(case, "4")
    if case in ("corrupt-latest", "missing-folder", "corrupt-state"):  # and nothing complete to fall back to
        for old in ("step-0000001", "step-0000002"):
            shutil.rmtree(out / "checkpoints" / old)
        break_latest(out, case)
        if case == "corrupt-latest":
            break_latest(out, "incomplete-folder")
    if case == "non-finite-weights":
        poison_file(out / "checkpoints" / "step-0000003" / "student.safetensors")
    resume = [] if case == "no-resume" else ["--resume"]
    return tiny_argv(world, out, "--steps", steps, "--ckpt-every", "1", *resume, *CHANGED.get(case, [])), out, RESUME[case]


@pytest.fixture(scope="module")
def refusals(world, finished, tmp_path_factory):
    """Every refused command line of the two tests below, run two at a time (each `python distill.py`
    spends about 1.5 s of CPU importing torch): {case: (result, --out, names, --out's files before)}."""
    cases = {case: bad_input(world, tmp_path_factory.mktemp(case), case) for case in BAD_INPUT}
    cases.update({case: bad_resume(world, finished, tmp_path_factory.mktemp(case), case) for case in RESUME})
    before = {case: listing(out) if os.path.isdir(out) else None for case, (_, out, _) in cases.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(lambda argv: distill_cli(*argv), [argv for argv, _, _ in cases.values()])))
    return {case: (results[case], out, names, before[case]) for case, (_, out, names) in cases.items()}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_cli_refuses_bad_input_before_anything_heavy(refusals, case):
    """Exit 2 and one line naming the argument or file, before any network loads (nothing on stdout,
    where the run's banner comes once they are loaded; the pickle teacher is refused by the loader),
    and no new file or folder in --out."""
    r, out, names, before = refusals[case]
    one_error(r, 2, *names)
    assert r.stdout == "" or case == "pickle-teacher", r.stdout
    assert (listing(out) if os.path.isdir(out) else None) == before


@pytest.mark.parametrize("case", list(RESUME))
def test_cli_refuses_a_resume_that_cannot_continue(refusals, case):
    """Exit 2, one line with both step numbers or the file that is wrong, before any network loads
    (but the checkpoint's weights, checked as they load); --out unchanged. A broken `latest` falls
    back to a complete checkpoint when there is one (next test): here there is none."""
    r, out, names, before = refusals[case]
    one_error(r, 2, *names)
    assert r.stdout == "" or case == "non-finite-weights", r.stdout
    assert listing(out) == before


def test_cli_relaunch_of_a_finished_run_exits_0_and_writes_nothing(world, finished, tmp_path):
    """The same command line again, once the run finished (a scheduler's retry): one line saying so and
    where the files are, exit 0, --out unchanged (tests/run/test_relaunch.py: kills at the final writes)."""
    out = copy_of(finished, tmp_path)
    before = listing(out)
    r = distill_cli(*tiny_argv(world, out, "--steps", "3", "--ckpt-every", "1", "--keep", "3", "--resume"))
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [r.stdout.strip()] and r.stdout.startswith(
        f"{out} is already finished at step 3") and str(out / "student.safetensors") in r.stdout
    assert listing(out) == before


@pytest.mark.parametrize("how, step", [("corrupt-latest", 3), ("missing-folder", 2)])
def test_cli_resumes_from_the_newest_complete_checkpoint_when_latest_is_broken(world, finished, tmp_path, how, step):
    """The documented choice: a warning naming what is wrong, then the newest complete checkpoint."""
    out = copy_of(finished, tmp_path)
    break_latest(out, how)
    r = distill_cli(*tiny_argv(world, out, "--steps", "4", "--ckpt-every", "1", "--resume", "--keep", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "checkpoints/latest" in warnings[0]
    assert warnings[0].endswith("resuming from the newest complete checkpoint, " +
                                str(out / "checkpoints" / f"step-{step:07d}")), warnings[0]
    assert f"resuming at step {step}" in r.stdout
    assert [rec["step"] for rec in read_log(out)] == [1, 2, 3, 4]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000003", "step-0000004"]
    assert_sound(out)


@pytest.mark.parametrize("how, why", [("incomplete-folder", "has no state.json"),
                                      ("truncated-file", "has student.safetensors of 100 bytes"),
                                      ("corrupt-state", "has a corrupt state.json")])
def test_an_incomplete_checkpoint_is_never_resumed(finished, tmp_path, capsys, how, why):
    """Complete: state.json (written last) parses and every file it lists has the size it lists."""
    out = copy_of(finished, tmp_path)
    break_latest(out, how)
    folder, state = training_state.resume_point(str(out))
    assert folder.endswith("step-0000002") and state["step"] == 2
    assert training_state.latest_checkpoint(str(out)) is None
    warning = capsys.readouterr().err
    assert warning.startswith("warning: ") and f"step-0000003, which {why}" in warning


def test_cli_removes_temporaries_and_prunes_by_completeness(world, finished, tmp_path):
    """Leftovers of a kill (NAME.tmp-XXXX anywhere under --out) are removed at start and listed;
    pruning keeps the newest COMPLETE checkpoints: an incomplete folder of a later step (named
    newest) is deleted, never kept in place of a complete one."""
    out = copy_of(finished, tmp_path)
    leftovers = [out / "student.safetensors.tmp-k9x2ab_1", out / "checkpoints" / "latest.tmp-0q1w2e3r",
                 out / "checkpoints" / "step-0000003" / "optimizer.safetensors.tmp-zz8y7x6w"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    (out / "checkpoints" / "step-0000009").mkdir()  # a folder a killed run began, never finished
    shutil.copy(out / "checkpoints" / "step-0000003" / "student.safetensors", out / "checkpoints" / "step-0000009")
    r = distill_cli(*tiny_argv(world, out, "--steps", "5", "--ckpt-every", "1", "--resume", "--keep", "2"))
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert "removed 3 temporary file(s) left by a killed run" in r.stdout
    assert all(str(path) in r.stdout and not path.exists() for path in leftovers)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000004", "step-0000005"]
    assert all(training_state.checkpoint_state(str(out / "checkpoints" / d))[0] for d in ("step-0000004", "step-0000005"))
    assert_sound(out)


def test_cli_stops_on_non_finite_weights_and_writes_nothing_of_them(world, tmp_path):
    """Each AdamW step followed by weights x 1e30 (as an overflowing update would leave them; --lr is bounded
    by 1): after step 1 the weights are finite (about 1e28) and useless (their forward is inf / NaN).
    Nothing is written for that step; exit 1, one line naming the step."""
    out = tmp_path / "run"
    blow = tmp_path / "blow.py"
    blow.write_text(f"""import runpy, sys, torch
sys.path.insert(0, {str(REPO)!r})
step = torch.optim.AdamW.step
def blown(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    with torch.no_grad():
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1e30)
    return result
torch.optim.AdamW.step = blown
runpy.run_path("distill.py", run_name="__main__")
""")
    r = subprocess.run([sys.executable, str(blow), *tiny_argv(world, out, "--steps", "3", "--ckpt-every", "1")],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    one_error(r, 1, "after step 1 the student's weights give a non-finite output", "nothing was written for step 1",
              "no checkpoint with finite weights was written yet")
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "student.safetensors")
    assert not os.path.exists(out / "log.jsonl") and not os.path.exists(out / "samples")  # no line, no grid of it
    assert_sound(out)


def test_cli_non_finite_loss_names_the_newest_finite_checkpoint(world, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    r = distill_cli(*tiny_argv(world, out, "--steps", "5", "--resume", data=world["poison"]))
    one_error(r, 1, "non-finite loss (nan) at step 4", "finite weights is " + str(out / "checkpoints" / "step-0000003"))
    assert training_state.latest_checkpoint(str(out)).endswith("step-0000003")
    assert_sound(out)


def test_newest_finite_checkpoint_is_verified_not_trusted(finished, tmp_path):
    """`latest` names step 3; its student file (complete by size) holds a NaN: step 2 is named."""
    out = copy_of(finished, tmp_path)
    poison_file(out / "checkpoints" / "step-0000003" / "student.safetensors")
    assert training_state.latest_checkpoint(str(out)).endswith("step-0000003")
    assert training_state.newest_finite_checkpoint(str(out)).endswith("step-0000002")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_cli_names_a_corrupt_shard(world, tmp_path, workers):
    """The index is fine, the shard is cut short: found when first read (also in a DataLoader worker),
    named with its path; --out, created by the run, is removed again."""
    data = tmp_path / "data"
    make_shards(data)
    shard = data / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    out = tmp_path / "out"
    r = distill_cli(*tiny_argv(world, out, "--steps", "2", "--workers", workers, data=str(data)))
    line = one_error(r, 2, f"{shard} is a corrupt shard", "SafetensorError")
    assert ("DataLoader worker process 0" in line) == (workers == "1")
    assert not out.exists()


def test_cli_one_run_per_out(world, tmp_path):
    """A live holder (here: this test's own process) refuses a second run, naming its pid and host; the
    lock of a process that is gone is taken over with a warning, and released at the end."""
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "process_start": cli._process_start(os.getpid()),
          "started": "2026-11-22 10:00:00", "command": "distill.py --out run"}
    (out / cli.LOCK_NAME).write_text(json.dumps(me))
    r = distill_cli(*tiny_argv(world, out, "--steps", "1"))
    one_error(r, 2, f"--out {out} is in use by another run", f"pid {os.getpid()} on host {host}")
    assert os.listdir(out) == [cli.LOCK_NAME] and r.stdout == ""

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / cli.LOCK_NAME).write_text(json.dumps(dict(me, pid=gone.pid, process_start=None)))
    r = distill_cli(*tiny_argv(world, out, "--steps", "1"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"warning: --out {out}: taking over the lock of a run that is gone (pid {gone.pid}")
    assert not (out / cli.LOCK_NAME).exists()


def test_torchrun_workers_die_with_their_launcher(world, tmp_path):
    """SIGKILL torchrun's whole process group after the first checkpoint (torchrun starts each worker in
    a session of its own, so the kill does not reach them): no worker survives it by more than a few
    seconds, and nothing in --out changes afterwards."""
    import time

    out = tmp_path / "run"
    argv = tiny_argv(world, out, "--steps", "100000", "--ckpt-every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "distill.py", *argv], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while training_state.latest_checkpoint(str(out)) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = processes_writing(out)
        assert training_state.latest_checkpoint(str(out)) and len(workers) == 2, proc.poll()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.time()
    while processes_writing(out) and time.time() < killed + 5:
        time.sleep(0.05)
    assert not processes_writing(out), f"orphaned workers {processes_writing(out)}"
    before = listing(out)
    time.sleep(1.5)
    assert listing(out) == before


def processes_writing(out):
    """The live (not zombie) distill.py workers whose command line names out, from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(out).encode() in argv and b"distill.py" in argv and b"torch.distributed.run" not in argv \
                and state != "Z":
            found.append(int(pid))
    return found
