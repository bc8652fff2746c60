"""
Why does a toy student reproduce (or not) its reflection teacher? The measurements behind the toy
world's defaults, each on the DEV prompts (toy.py holds out 100 DEV prompts for choosing settings,
the 200 TEST prompts only for the final report), with 95% confidence intervals over prompts.

    ratio   the size of Eq. 7's fused term next to c at initialisation:
            |G(psi(w)) * F(y - y_null)| * scale / |c| over the prompts, for t and w of a grid, at the
            released 1/256 and without it. Also on a real checkpoint: --teacher FILE --data SHARDS.
    runs    students trained with distill.py's own Algorithm 1 (the same command line a user types),
            one per configuration (--method, --fused-scale, --target), each evaluated at every budget of
            --budgets: a run trains to the first budget, is scored, then resumes to the next (the lr is
            constant and the draws are counter-based, so a resumed run IS the longer run). Per point:
              rmse       mean per-image RMSE to the teacher's images (same prompts, noise and w = 4)
              cfg_rmse   the same for Euler + CFG at w = 4: the distance a student must beat to be
                         "closer to its teacher than CFG is" (paired difference, with its CI)
              follows    per-image RMSE between images at w = 2 and w = 8 from the same noise, and its
                         ratio to the teacher's (the paper: the student follows w like its teacher)
              adherence  toy.scores' adherence at w = 4, next to the teacher's
            Writes OUT/study.json (every number), OUT/study.md, and the curves OUT/study-*.png.
    rounding  what the authors' released pipeline changes by forming 1000 w in bf16 (4992 at w = 5) where
            training formed it in float32: per-image RMSE between a student's images both ways, next to
            the RMSE a change of w by 1 makes.
    figure  the runs of several studies (--load OUT/study.json, repeatable) in one table and one set of
            curves under --out.

    python -m evaluation.toy_study ratio
    python -m evaluation.toy_study rounding --student runs/toy/student.safetensors
    python -m evaluation.toy_study runs --out runs/study-budget --budgets 500,1000,1500,3000,6000,12000 \\
        --config teefusion:0.00390625:step --config distillcfg
    python -m evaluation.toy_study runs --out runs/study-scale --budgets 1500 --config teefusion:0.00390625 \\
        --config teefusion:0.015625 --config teefusion:0.0625 --config teefusion:0.25 --config teefusion:1
    python -m evaluation.toy_study runs --out runs/study-floor --budgets 1500,6000 --config teefusion:0.25::cfg \
        --config teefusion:0.25:reflected
    python -m evaluation.toy_study figure --load runs/study-budget/study.json --load runs/study-floor/study.json \
        --out docs/images/toy-study

A configuration is METHOD[:SCALE[:TARGET[:TEACHER[:LR]]]] (distill.py's --method, --fused-scale, --target,
--teacher-sampler, --lr; an empty field keeps the default); every run uses the toy defaults of distill.py otherwise (W2SD + CFG teacher, batch 32, lr 1e-3). Runs are
resumable: relaunching the same command reuses every point already scored (OUT/study.json) and
every run folder's checkpoints.
"""

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file (python evaluation/toy_study.py): the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import math
import os
import time
from fractions import Fraction

import torch

from run import cli
import embed
import samplers
from run import options
from evaluation import plots
import toy
from evaluation import toy_report
from sd3.checkpoint import atomic_json, atomic_write

STUDY_W = 4.0  # the report's guidance
FOLLOW_WS = (2.0, 8.0)  # toy_report.follows_w's pair
GRID_T, GRID_W = (0.2, 0.5, 0.9), (2.0, 4.0, 14.0)


# -----------------------------------------------------------------------------
# The fused term's size at initialisation


@torch.no_grad()
def fused_ratio(model, y, y_null, t, w):
    """Median over the prompts of |G(psi(w)) * F(y - y_null)| / |c|, c = G(psi(t)) + F(y) (Eq. 6), unscaled:
    Eq. 7's fused term (scale 1) next to the conditioning it is added to. y (B, Dy), y_null (1, Dy)."""
    B = y.shape[0]
    c = embed.sd3_conditioning(model, torch.full((B,), t), y)  # (B, D)
    wt = embed.guidance_tensor(w, B, y.device)
    fused = model.t_embedder(embed.timestep_embedding(wt, model.config.frequency_dim)) * model.y_embedder(y - y_null)
    return (fused.norm(dim=1) / c.norm(dim=1)).median().item()


def ratio_table(model, y, y_null):
    """{(t, w): unscaled ratio} on GRID_T x GRID_W."""
    return {(t, w): fused_ratio(model, y, y_null, t, w) for t in GRID_T for w in GRID_W}


def format_ratio(table, width, source):
    lines = [f"Eq. 7's fused term at initialisation, {source} (width D = {width}): median over prompts of "
             "|G(psi(w)) * F(y - y_null)| * scale / |G(psi(t)) + F(y)|",
             f"{'t':>5} {'w':>5} {'scale 1 (paper)':>17} {'scale 1/256 (release)':>22}"]
    for (t, w), r in table.items():
        lines.append(f"{t:5.2f} {w:5g} {r:17.2e} {r * embed.RELEASED_SCALE:22.2e}")
    return "\n".join(lines)


def ratio_main(args):
    if args.teacher is None:
        world = toy.build_world(args.cache_dir, progress=False)
        model = world.load("teacher")
        ds = world.dataset("dev")
        y, y_null = ds.y, world.encoders.encode_null()[1]  # (P, Dy), (1, Dy)
        source = f"toy teacher, {len(y)} DEV prompts"
    else:
        from mmdit import load_mmdit
        from prepare import ShardDataset

        model = load_mmdit(args.teacher).eval().requires_grad_(False)
        ds = ShardDataset(args.data)
        n = min(len(ds), args.prompts)
        y = torch.stack([ds[i]["y"] for i in range(n)]).float()
        y_null = ds.null()[1].float()
        source = f"{args.teacher}, {n} captions of {args.data}"
    text = format_ratio(ratio_table(model, y, y_null), model.config.hidden_size, source)
    print(text)
    return text


# -----------------------------------------------------------------------------
# Students at several budgets, scored on DEV


def parse_config(text):
    """METHOD[:SCALE[:TARGET[:TEACHER[:LR]]]] -> dict(method, fused_scale, target, teacher, lr) and its run
    name; an empty field keeps distill.py's toy default (SCALE: --fused-scale, e.g. 0.25 or 1/4; TARGET:
    --target; TEACHER: --teacher-sampler; LR: --lr)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 5 or parts[0] not in options.METHODS:
        raise ValueError(f"--config {text!r}: expected METHOD[:SCALE[:TARGET[:TEACHER[:LR]]]] with METHOD one of "
                         f"{options.METHODS}")
    parts += [""] * (5 - len(parts))
    method, scale, target, teacher, lr = parts
    try:
        scale = float(Fraction(scale)) if scale else None
        lr = float(lr) if lr else None
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--config {text!r}: the scale and the lr must be numbers (e.g. 0.25 or 1/4, 3e-4)") from None
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= 1):
        raise ValueError(f"--config {text!r}: the lr {lr:g} must be a finite number in (0, 1] (AdamW's, as distill.py "
                         "--lr)")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--config {text!r}: the scale {scale:g} must be a finite number > 0 (Eq. 7's factor)")
    target = target or "step"
    if target not in ("step", "reflected"):
        raise ValueError(f"--config {text!r}: the target must be step or reflected")
    teacher = teacher or "w2sd"
    if teacher not in ("cfg", "zsampling", "w2sd"):
        raise ValueError(f"--config {text!r}: the teacher must be cfg, zsampling or w2sd")
    name = (method + (f"-s{scale:g}" if scale is not None else "") + (f"-{target}" if target != "step" else "")
            + (f"-{teacher}" if teacher != "w2sd" else "") + (f"-lr{lr:g}" if lr is not None else ""))
    return dict(method=method, fused_scale=scale, target=target, teacher=teacher, lr=lr, name=name)


def train_to(config, out, steps, no_progress):
    """distill.py's Algorithm 1 for this configuration up to `steps` (resuming the run in `out`);
    returns the student's path."""
    import distill

    argv = ["--method", config["method"], "--target", config["target"], "--teacher-sampler", config["teacher"],
            "--out", out, "--steps", str(steps), "--ckpt-every", str(steps), "--keep", "1", "--no-report", "--resume"]
    if config["fused_scale"] is not None:
        argv += ["--fused-scale", repr(config["fused_scale"])]
    if config["lr"] is not None:
        argv += ["--lr", repr(config["lr"])]
    if no_progress:
        argv.append("--no-progress")
    return distill.main(options.parse_args(argv))  # with --resume, a finished student says so and is reused


def ratio_ci(a, b, groups, n=2000, seed=0):
    """(ratio of means, lo, hi) of mean(a) / mean(b), resampling prompts (groups) as toy_report does."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    _, g = torch.unique(torch.as_tensor(groups), return_inverse=True)
    G = int(g.max()) + 1
    sa = torch.zeros(G, dtype=torch.float64).index_add_(0, g, a)
    sb = torch.zeros(G, dtype=torch.float64).index_add_(0, g, b)
    pick = torch.randint(G, (n, G), generator=torch.Generator().manual_seed(seed))  # (n, G)
    ratios = sa[pick].sum(1) / sb[pick].sum(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (a.sum() / b.sum()).item(), lo, hi


def score_point(ev, path, teacher="w2sd"):
    """The numbers of one student (a file) against its teacher on the Evaluation's prompts."""
    student = toy_report.load_students([dict(path=path, teacher=teacher, label=path)])[0]
    tlabel = toy_report.TEACHER_NAMES[teacher]
    t_img = ev.get(tlabel, teacher, STUDY_W)
    cfg_img = ev.get("Euler + CFG", "cfg", STUDY_W)
    ev.images = {k: v for k, v in ev.images.items() if k[0] != path}  # a new file under the same path
    s_img = ev.get(path, "student", STUDY_W, student)
    d_student, d_cfg = toy_report.rmse(s_img, t_img), toy_report.rmse(cfg_img, t_img)
    follow_t = toy_report.rmse(*[ev.get(tlabel, teacher, w) for w in FOLLOW_WS])
    follow_s = toy_report.rmse(*[ev.get(path, "student", w, student) for w in FOLLOW_WS])
    adherence_s = toy.scores(s_img, ev.prompts)["adherence"]
    adherence_t = toy.scores(t_img, ev.prompts)["adherence"]
    return dict(rmse=ev.ci(d_student), cfg_rmse=ev.ci(d_cfg), closer_than_cfg=ev.compare(d_student, d_cfg),
                follows=ev.ci(follow_s), teacher_follows=ev.ci(follow_t),
                follows_ratio=ratio_ci(follow_s, follow_t, ev.groups),
                adherence=ev.ci(100 * adherence_s), teacher_adherence=ev.ci(100 * adherence_t),
                adherence_vs_teacher=ev.compare(100 * adherence_s, 100 * adherence_t))


def _triple(comparison):
    return comparison["diff"], comparison["lo"], comparison["hi"]


def _ci(v, digits=3):
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def format_points(results):
    lines = [f"{'run':<28} {'steps':>6} {'RMSE to teacher':>22} {'minus CFG':>24} {'follows / teacher':>22} "
             f"{'adherence %':>20} {'loss':>7}"]
    references = {}  # teacher -> one of its points: the teacher's own numbers are the same in each
    for name, points in results.items():
        for steps, p in sorted(points.items(), key=lambda kv: int(kv[0])):
            teacher = p.get("config", {}).get("teacher", "w2sd")
            references.setdefault(teacher, p)
            # against the CFG teacher, "minus CFG" would subtract the teacher from itself: left blank
            minus = "-" if teacher == "cfg" else _ci(_triple(p["closer_than_cfg"]))
            lines.append(f"{name:<28} {int(steps):>6} {_ci(p['rmse']):>22} {minus:>24} "
                         f"{_ci(p['follows_ratio'], 2):>22} {_ci(p['adherence'], 1):>20} {p.get('loss', float('nan')):7.3f}")
    for teacher, p in references.items():
        label = toy_report.TEACHER_NAMES[teacher]
        cfg = "" if teacher == "cfg" else f"Euler + CFG's RMSE to it {_ci(p['cfg_rmse'])}, "
        lines.append(f"reference (the {label} teacher): {cfg}its follows-w {_ci(p['teacher_follows'])}, "
                     f"adherence {_ci(p['teacher_adherence'], 1)}")
    return "\n".join(lines)


def final_loss(out, n=50):
    """Mean loss of the last n steps of a run's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(r["loss"] for r in rows[-n:]) / len(rows[-n:])


def curves(results, out_dir):
    """One PNG per quantity, x = training steps, a line (with 95% bars) per run; the teacher's (or CFG's)
    level as its own line where it is the bar to clear. Returns the paths."""
    paths = []
    quantities = (("rmse", "RMSE to its teacher (lower: closer)", "cfg_rmse", "Euler + CFG"),
                  ("follows_ratio", "follows w: student / teacher", None, None),
                  ("adherence", "adherence % (w = 4)", "teacher_adherence", "teacher"))
    for key, title, ref, ref_label in quantities:
        data, bars = {}, {}
        for name, points in results.items():
            steps = sorted(points, key=int)
            xs = [int(s) for s in steps]
            data[name] = (xs, [points[s][key][0] for s in steps])
            bars[name] = ([points[s][key][1] for s in steps], [points[s][key][2] for s in steps])
        all_x = sorted({x for xs, _ in data.values() for x in xs})
        if ref is not None:  # one level per teacher (CFG's distance to the CFG teacher is 0: not drawn)
            teachers = {}
            for points in results.values():
                for p in points.values():
                    teachers.setdefault(p.get("config", {}).get("teacher", "w2sd"), p)
            for teacher, p in teachers.items():
                if not (ref == "cfg_rmse" and teacher == "cfg"):
                    label = ref_label if len(teachers) == 1 else f"{ref_label} ({toy_report.TEACHER_NAMES[teacher]})"
                    data[label] = (all_x, [p[ref][0]] * len(all_x))
        if key == "follows_ratio":
            data["0.8 of the teacher"] = (all_x, [0.8] * len(all_x))
        path = os.path.join(out_dir, f"study-{key}.png")
        plots.line_plot(data, path, title=f"{title}, DEV prompts, 95% CI", xlabel="training steps", ylabel=key,
                        bars=bars)
        paths.append(path)
    return paths


def runs_main(args):
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--budgets {args.budgets}: give training steps >= 1, comma-separated")
    if not args.config:
        raise ValueError("runs needs at least one --config METHOD[:SCALE[:TARGET[:TEACHER[:LR]]]]")
    configs = [parse_config(c) for c in args.config]
    if len({c["name"] for c in configs}) != len(configs):
        raise ValueError("two --config name the same run")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "study.json")
    results = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            results = json.load(f)["results"]
    world = toy.build_world(args.cache_dir, progress=not args.no_progress)
    start = time.time()
    with toy.one_thread():
        ev = toy_report.Evaluation(world, "dev", n_seeds=args.seeds, steps=args.sample_steps)
        for config in configs:
            points = results.setdefault(config["name"], {})
            run_dir = os.path.join(args.out, config["name"])
            for steps in budgets:
                if str(steps) in points:
                    continue
                path = train_to(config, run_dir, steps, args.no_progress)
                point = score_point(ev, path, config["teacher"])
                point["loss"] = final_loss(run_dir)
                point["config"] = {k: config[k] for k in ("method", "fused_scale", "target", "teacher", "lr")}
                points[str(steps)] = point
                atomic_json(dict(results=results), json_path)
                print(f"{config['name']} at {steps} steps: RMSE to teacher {_ci(point['rmse'])} (CFG "
                      f"{_ci(point['cfg_rmse'])}), follows w {_ci(point['follows_ratio'], 2)} of the teacher, "
                      f"adherence {_ci(point['adherence'], 1)}", flush=True)
    text = format_points({c["name"]: results[c["name"]] for c in configs})
    paths = curves({c["name"]: results[c["name"]] for c in configs}, args.out) if len(budgets) > 1 else []
    text += "\n" + "".join(f"figure: {p}\n" for p in paths) + f"(study: {time.time() - start:.0f} s)"
    print(text)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("```\n" + text + "\n```\n")

    atomic_write(os.path.join(args.out, "study.md"), write)
    return results


# -----------------------------------------------------------------------------
# The released pipeline's bf16 rounding of 1000 w


def rounding_main(args):
    """What forming 1000 w in bf16 (the authors' released pipeline: w = 5 enters psi as 4992) instead of float32
    (this project's training and sampling) changes in a toy student's images, on the DEV prompts: the per-image
    RMSE between the two, next to the RMSE that a change of w by 1 makes (w -> w + 1, float32 both)."""
    if not os.path.isfile(args.student):
        raise FileNotFoundError(f"--student {args.student}: no such file")
    toy.check_network(args.student, "--student")  # from its header: a toy-world network, floating point
    world = toy.build_world(args.cache_dir, progress=False)
    lines = [f"bf16 rounding of 1000 w, {args.student}, DEV prompts x {args.seeds} seeds, {args.sample_steps} steps: "
             "per-image RMSE, mean [95% CI]",
             f"{'w':>5} {'1000 w in bf16':>15} {'fp32 vs bf16 psi':>24} {'w vs w + 1 (fp32)':>24}"]
    with toy.one_thread():
        ev = toy_report.Evaluation(world, "dev", n_seeds=args.seeds, steps=args.sample_steps)
        specs = {k: dict(path=args.student, label=k) for k in ("fp32", "bf16")}
        fp32 = toy_report.load_students([specs["fp32"]])[0]
        bf16 = toy_report.load_students([specs["bf16"]])[0]
        bf16["fusion"].w_dtype = torch.bfloat16  # as TeEFusion(w_dtype=torch.bfloat16) forms it
        for w in args.ws:
            a = ev.get("fp32", "student", w, fp32)
            b = ev.get("bf16", "student", w, bf16)
            c = ev.get("fp32", "student", w + 1, fp32)
            rounded = torch.tensor(1000 * w, dtype=torch.float32).to(torch.bfloat16).item()
            lines.append(f"{w:5g} {rounded:15g} {_ci(ev.ci(toy_report.rmse(a, b)), 4):>24} "
                         f"{_ci(ev.ci(toy_report.rmse(a, c)), 4):>24}")
    text = "\n".join(lines)
    print(text)
    return text


def _numbers(point):
    """A scored point's measured numbers (not its training loss, which sums the log's last steps)."""
    return {k: v for k, v in point.items() if k not in ("loss", "config")}


def figure_main(args):
    """The runs of several studies (their study.json, --load, repeatable) in one table and one set of curves
    under --out: e.g. the budget curves of two scales beside the CFG-teacher floor."""
    if not args.load:
        raise ValueError("figure needs --load STUDY.json (repeatable): the study.json files of earlier runs")
    results = {}
    for path in args.load:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load {path}: no such file (a runs study's study.json)")
        data = cli.read_json(path, f"--load {path}")
        with cli.reading(path, f"--load {path}"):
            if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
                raise cli.InputError(f"--load {path}: not a study.json (no \"results\" mapping)")
            for name, points in data["results"].items():
                mine = results.setdefault(name, {})
                for steps, point in points.items():  # a run in two studies: the union of its budgets
                    if steps in mine and _numbers(mine[steps]) != _numbers(point):
                        raise cli.InputError(f"--load {path}: run {name} at {steps} steps is also in an earlier "
                                             "--load, with other numbers")
                    mine[steps] = point
    os.makedirs(args.out, exist_ok=True)
    text = format_points(results) + "\n" + "".join(f"figure: {p}\n" for p in curves(results, args.out))
    print(text.rstrip())
    return results


def main(args):
    if args.command == "figure":
        return figure_main(args)
    if args.seeds < 1 or args.sample_steps < 1:
        raise ValueError(f"--seeds {args.seeds} and --sample-steps {args.sample_steps} must be at least 1")
    if args.command == "rounding":
        if args.student is None:
            raise ValueError("rounding needs --student FILE (a TeEFusion student written by distill.py)")
        for w in args.ws:
            samplers.check_w(w, "--ws")
        return rounding_main(args)
    if args.command == "ratio":
        if (args.teacher is None) != (args.data is None):
            raise ValueError("ratio on a real checkpoint needs both --teacher FILE and --data SHARDS (prepare.py)")
        return ratio_main(args)
    return runs_main(args)


def build_parser():
    parser = cli.parser("The toy world's study: Eq. 7's scale, the training budget, the target (DEV prompts).", prog="python -m evaluation.toy_study")
    parser.add_argument("command", choices=("ratio", "runs", "rounding", "figure"))
    parser.add_argument("--cache-dir", default="cache/toy")
    parser.add_argument("--teacher", default=None, help="ratio: a real MMDiT checkpoint instead of the toy teacher")
    parser.add_argument("--data", default=None, help="ratio: prepare.py shards whose captions give y")
    parser.add_argument("--prompts", type=int, default=256, help="ratio: captions read from --data")
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--budgets", default="1500", help="runs: training steps at which each run is scored")
    parser.add_argument("--config", action="append", default=[], help="runs: METHOD[:SCALE[:TARGET[:TEACHER[:LR]]]] "
                        "(repeatable), e.g. teefusion:0.25::cfg")
    parser.add_argument("--load", action="append", default=[], help="figure: a study.json of runs (repeatable)")
    parser.add_argument("--student", default=None, help="rounding: a TeEFusion student of the toy world")
    parser.add_argument("--ws", type=float, nargs="+", default=[4.0, 5.0, 7.5], help="rounding: the w to compare")
    parser.add_argument("--seeds", type=int, default=2, help="runs, rounding: images per DEV prompt")
    parser.add_argument("--sample-steps", type=int, default=20, help="runs, rounding: sampling steps (the report's 20)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


if __name__ == "__main__":
    cli.run(main, build_parser())
