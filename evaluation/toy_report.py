"""
The toy world's report: the paper's claims (Tables 3 and 4, Fig. 4, Fig. 5a, 5b, "the student
follows w") measured on the held-out prompts of toy.py, every score with a 95% confidence
interval, and every claim as a paired comparison that says whether it is significant.

    Table 4   unguided Euler, Euler + CFG, Z-Sampling + CFG, W2SD + CFG and each student: NFE,
              ms / image, the wall-time and NFE ratios to one pass per step, the scores of
              toy.scores (adherence, clean, fidelity), each student's RMSE to its own teacher and
              to Euler + CFG at the same w, and the CFG w whose images are closest to each row's
    Table 3   TeEFusion, G only, DistillCFG (and DICE) distilled from the same teacher; a LoRA student
              (distill.py --lora) against the full TeEFusion student of its teacher
    Fig. 4    samples.png: methods x w, labelled
    Fig. 5a   sweep-adherence.png, sweep-fidelity.png: score vs w for the teacher, its student, CFG
    Fig. 5b   loss.png: the training loss of the Table 3 students
    follows   follows-w.png and its numbers: teacher and students at w = 2 and w = 8, same noise

Confidence intervals: percentile bootstrap (2,000 resamples) over the held-out PROMPTS, each
prompt keeping its images (seeds), so images of one prompt are not counted as independent. A
comparison of two rows uses the same resamples on the per-image differences (paired); it is
significant when its 95% interval excludes 0.

Time: every row samples the same images in one batch (after a warm-up call); on a CPU a batch of
2B rows costs less than twice a batch of B, so the teachers' wall-time ratios to the student sit
below their NFE ratios (on a GPU at SD3 size the two agree, a forward being compute-bound).

    python distill.py                       # trains a student, then calls `report`
    python -m evaluation.toy_report --student runs/toy/student.safetensors [--teacher w2sd]
    python -m evaluation.toy_report                    # the teacher samplers alone

The command line keeps the relaunch rule (run/relaunch.py): it holds --out's lock, removes the temporary files
a killed report left, and records its files in OUT/report.record.json with what they are a function of
(the students' SHA-256, the world's cache, the settings); the same command relaunched once they are all
there says so and writes nothing, exit 0.
"""

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file (python evaluation/toy_report.py): the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import math
import os
import time
from contextlib import ExitStack

import torch
from tqdm import tqdm

from sd3 import checkpoint
from run import cli
from sd3 import lora
from evaluation import plots
from run import relaunch
import samplers
import toy
from sd3 import vae
from sd3.checkpoint import atomic_json, atomic_write
from sd3 import student_file

TEACHER_ROWS = (("unguided (Euler)", "euler"), ("Euler + CFG", "cfg"), ("Z-Sampling + CFG", "zsampling"),
                ("W2SD + CFG", "w2sd"))
TEACHER_NAMES = {m: name for name, m in TEACHER_ROWS}
METHOD_NAMES = {"teefusion": "TeEFusion", "gonly": "G only", "gonly-scaled": "G only (scaled)",
                "distillcfg": "DistillCFG", "dice": "DICE"}
SCORES = ("adherence", "clean", "fidelity")
CFG_WS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0)  # for "the CFG w closest"
SWEEP_WS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 14.0)  # Fig. 5a (in CFG_WS: CFG's images are shared)
GRID_WS = (1.0, 2.0, 4.0, 8.0)  # Fig. 4
VIEW = 8  # a toy pixel is drawn as VIEW x VIEW screen pixels


# -----------------------------------------------------------------------------
# 95% confidence intervals: a bootstrap over prompts


def bootstrap(values, groups, n=2000, seed=0):
    """(mean, lo, hi): the mean of values (N,) and its 95% percentile interval, resampling the
    groups (prompts; groups (N,) long) with replacement, each with all its values."""
    values = torch.as_tensor(values, dtype=torch.float64)
    _, g = torch.unique(torch.as_tensor(groups), return_inverse=True)
    G = int(g.max()) + 1
    sums = torch.zeros(G, dtype=torch.float64).index_add_(0, g, values)  # (G,)
    counts = torch.zeros(G, dtype=torch.float64).index_add_(0, g, torch.ones_like(values))
    pick = torch.randint(G, (n, G), generator=torch.Generator().manual_seed(seed))  # (n, G)
    means = sums[pick].sum(1) / counts[pick].sum(1)  # (n,)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return values.mean().item(), lo, hi


def paired(a, b, groups, n=2000, seed=0):
    """Mean of a - b (same images) with its 95% interval; significant when it excludes 0."""
    mean, lo, hi = bootstrap(torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64),
                             groups, n, seed)
    return dict(diff=mean, lo=lo, hi=hi, significant=lo > 0 or hi < 0)


def rmse(a, b):
    """Per-image RMSE between two batches of images, (B,)."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


# -----------------------------------------------------------------------------
# Sampling the held-out prompts: every row on the same noise, cached


class Evaluation:
    """The held-out prompts x seeds of a split, their text embeddings and noise, the world's
    teacher models, and the images of every (row, w) sampled so far."""

    def __init__(self, world, split="test", n_seeds=2, steps=20):
        self.world, self.steps = world, steps
        ds = world.dataset(split)
        P = len(ds.prompts)
        idx = torch.arange(P).repeat(n_seeds)  # (N,): prompt of each image, seeds in blocks
        self.prompts, self.groups = ds.prompts[idx], idx
        self.context, self.y = ds.context[idx], ds.y[idx]
        self.null = world.encoders.encode_null()
        g = torch.Generator().manual_seed(toy.ToyDataset.SEED_BASE[split] + 7)
        self.noise = torch.randn(len(idx), 3, toy.H, toy.W, generator=g)  # (N, 3, H, W)
        self.models = {k: world.load(k) for k in ("teacher", "weak")}
        self.images, self.timing = {}, {}

    def sample(self, method, w, student=None, rows=None, steps=None):
        """Images of one sampler (a student: dict with "model", "fusion") at w on all (or `rows`) images."""
        rows = slice(None) if rows is None else rows
        model = student["model"] if student else self.models["teacher"]
        kw = dict(fusion=student["fusion"]) if student else {}
        if method == "w2sd":
            kw["weak"] = self.models["weak"]  # the strong model is the teacher (Eq. 4: it moves too)
        context_null, y_null = self.null
        return samplers.sample(method, model, self.noise[rows], self.context[rows], self.y[rows], context_null, y_null,
                               w=None if method == "euler" else w, steps=steps or self.steps, **kw)

    def get(self, label, method, w, student=None, timed=False):
        """The (N, 3, H, W) images of a row at w, sampled once and cached; timed: also its ms / image."""
        key = (label, None if method == "euler" else float(w))
        if key not in self.images:
            if timed:  # warm-up (first calls allocate and pick kernels), so timings compare like with like
                self.sample(method, w, student, rows=slice(0, 2), steps=2)
            start = time.perf_counter()
            x0, nfe = self.sample(method, w, student)
            self.timing[key] = dict(nfe=nfe, ms=1000 * (time.perf_counter() - start) / len(x0))
            self.images[key] = x0
        return self.images[key]

    def scores(self, label, method, w, student=None):
        return toy.scores(self.get(label, method, w, student), self.prompts)

    def ci(self, values):
        return bootstrap(values, self.groups)

    def compare(self, a, b):
        return paired(a, b, self.groups)


# -----------------------------------------------------------------------------
# The students


def load_students(specs, device="cpu"):
    """specs: dicts with "path" (a student .safetensors written by distill.py), optional "teacher"
    (its samplers.TEACHERS name, else read from the file's metadata) and "label". Returns dicts
    with model, fusion, method, teacher, label."""
    described = describe_students(specs)
    out = []
    for spec, info in zip(specs, described):
        model, fusion = student_file.load_student(spec["path"], device=device)
        out.append(dict(model=model, fusion=fusion, **info, path=spec["path"],
                        log=os.path.join(os.path.dirname(spec["path"]), "log.jsonl")))
    return out


def describe_students(specs):
    """From the files' headers alone (main calls it before the world is built): per spec a dict with
    method, teacher, lora (the adapter settings of a merged LoRA student, or None) and label; two
    students of one label are refused."""
    out = []
    for spec in specs:
        method, _ = student_file.student_files(spec["path"])
        teacher = spec.get("teacher") or _metadata(spec["path"]).get("teefusion_teacher")
        if teacher is None:
            raise ValueError(f"{spec['path']}: which teacher was it distilled from? (pass teacher=; distill.py "
                             "records it in the file's metadata)")
        teacher = samplers.canonical(teacher, samplers.TEACHERS)
        stored = _metadata(spec["path"]).get(lora.METADATA)  # a LoRA student (distill.py --lora), merged
        with cli.reading(spec["path"], f"{spec['path']} (its {lora.METADATA} metadata)"):
            adapters = json.loads(stored) if stored else None
        name = METHOD_NAMES.get(method, method) + (f" LoRA r{adapters['rank']}" if adapters else "")
        label = spec.get("label") or f"{name} <- {TEACHER_NAMES[teacher]}"
        out.append(dict(method=method, teacher=teacher, label=label, lora=adapters))
    labels = [s["label"] for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two students share a label in {labels}: give them distinct labels")
    return out


def _metadata(path):
    with ExitStack() as stack:
        return checkpoint.open_safetensors(path, stack).metadata() or {}


# -----------------------------------------------------------------------------
# Table 4 (and Table 3): rows, comparisons, text


def _ci_text(ci, scale=1.0, digits=1):
    mean, lo, hi = (scale * v for v in ci)
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def closest_cfg_w(ev, images):
    """The CFG w in CFG_WS whose images are closest (mean per-image RMSE) to `images`, and that RMSE."""
    dist = {w: rmse(images, ev.get("Euler + CFG", "cfg", w)).mean().item() for w in CFG_WS}
    w = min(dist, key=dist.get)
    return w, dist[w]


def table4(ev, students, w):
    """Rows of Table 4 (dicts) for the teacher samplers and the students at w, and comparisons."""
    rows, imgs = [], {}
    for label, method in TEACHER_ROWS:
        imgs[label] = ev.get(label, method, w, timed=True)
        rows.append(dict(label=label, method=method, teacher=None))
    for s in students:
        imgs[s["label"]] = ev.get(s["label"], "student", w, s, timed=True)
        rows.append(dict(label=s["label"], method="student", teacher=s["teacher"], student_method=s["method"]))
    base = next((r for r in rows if r["method"] == "student"), rows[0])  # one pass per step
    base_t = ev.timing[(base["label"], None if base["method"] == "euler" else float(w))]
    cfg = imgs["Euler + CFG"]
    for r in rows:
        t = ev.timing[(r["label"], None if r["method"] == "euler" else float(w))]
        s = toy.scores(imgs[r["label"]], ev.prompts)
        r.update(nfe=t["nfe"], ms_per_image=t["ms"], nfe_ratio=t["nfe"] / base_t["nfe"], wall_ratio=t["ms"] / base_t["ms"],
                 **{k: ev.ci(100 * v if k != "fidelity" else v) for k, v in s.items()})
        r["rmse_to_cfg"] = ev.ci(rmse(imgs[r["label"]], cfg))
        r["closest_cfg_w"], _ = closest_cfg_w(ev, imgs[r["label"]])
        if r["teacher"]:
            own = imgs[TEACHER_NAMES[r["teacher"]]]
            r["rmse_to_teacher"] = ev.ci(rmse(imgs[r["label"]], own))
    comparisons = []

    def compare(what, a, b, key, scale=100.0):
        sa, sb = toy.scores(imgs[a], ev.prompts)[key], toy.scores(imgs[b], ev.prompts)[key]
        c = ev.compare(scale * sa, scale * sb)
        comparisons.append(dict(claim=what, a=a, b=b, score=key, **c))

    for label in ("Euler + CFG", "Z-Sampling + CFG", "W2SD + CFG"):
        compare(f"{label} vs unguided", label, "unguided (Euler)", "adherence")
    for label in ("Z-Sampling + CFG", "W2SD + CFG"):
        for key in SCORES:
            compare(f"{label} vs Euler + CFG", label, "Euler + CFG", key, 1.0 if key == "fidelity" else 100.0)
    for s in students:
        own = TEACHER_NAMES[s["teacher"]]
        for key in ("adherence", "fidelity"):
            compare(f"{s['label']} vs its teacher", s["label"], own, key, 1.0 if key == "fidelity" else 100.0)
        if s["teacher"] != "cfg":  # a distilled reflection is closer to its teacher than CFG at w is
            d = ev.compare(rmse(imgs[s["label"]], imgs[own]), rmse(cfg, imgs[own]))
            comparisons.append(dict(claim=f"RMSE to {own}: {s['label']} minus Euler + CFG", a=s["label"],
                                    b="Euler + CFG", score="rmse_to_teacher", **d))
    return rows, comparisons, imgs


def table3(ev, students, imgs):
    """Comparisons of the ablations (paper Table 3) and of the LoRA students with the (first, full)
    TeEFusion student of the same teacher."""
    comparisons = []
    refs = {}
    for s in students:
        if s["method"] == "teefusion" and not s.get("lora"):
            refs.setdefault(s["teacher"], s)
    for s in students:
        ref = refs.get(s["teacher"])
        if ref is None or s is ref or (s["method"] == "teefusion" and not s.get("lora")):
            continue
        own = imgs[TEACHER_NAMES[s["teacher"]]]
        for key in SCORES:
            a = toy.scores(imgs[s["label"]], ev.prompts)[key]
            b = toy.scores(imgs[ref["label"]], ev.prompts)[key]
            scale = 1.0 if key == "fidelity" else 100.0
            comparisons.append(dict(claim=f"{s['label']} vs {ref['label']}", a=s["label"], b=ref["label"], score=key,
                                    **ev.compare(scale * a, scale * b)))
        d = ev.compare(rmse(imgs[s["label"]], own), rmse(imgs[ref["label"]], own))
        comparisons.append(dict(claim=f"RMSE to its teacher: {s['label']} minus {ref['label']}", a=s["label"],
                                b=ref["label"], score="rmse_to_teacher", **d))
    return comparisons


def format_rows(rows, title):
    width = max(18, *(len(r["label"]) for r in rows))
    head = (f"{'method':<{width}} {'NFE':>4} {'ms/img':>7} {'NFE x':>6} {'wall x':>6} {'adherence %':>19} "
            f"{'clean %':>19} {'fidelity':>20} {'RMSE to teacher':>21} {'RMSE to CFG':>21} {'CFG w':>5}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        teacher = _ci_text(r["rmse_to_teacher"], digits=3) if "rmse_to_teacher" in r else "-"
        lines.append(f"{r['label']:<{width}} {r['nfe']:>4.0f} {r['ms_per_image']:>7.2f} {r['nfe_ratio']:>6.2f} "
                     f"{r['wall_ratio']:>6.2f} {_ci_text(r['adherence']):>19} {_ci_text(r['clean']):>19} "
                     f"{_ci_text(r['fidelity'], digits=3):>20} {teacher:>21} "
                     f"{_ci_text(r['rmse_to_cfg'], digits=3):>21} {r['closest_cfg_w']:>5g}")
    return "\n".join(lines)


def format_comparisons(comparisons, title):
    lines = [title]
    for c in comparisons:
        digits = 1 if c["score"] in ("adherence", "clean") else 3
        mark = "significant" if c["significant"] else "not significant"
        lines.append(f"  {c['claim']:<58} {c['score']:<15} {c['diff']:+.{digits}f} "
                     f"[{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]  {mark}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Figures


def _pictures(x, k=4):
    """The first k images of x (B, 3, H, W) side by side as one PIL image, 1-pixel white gaps."""
    from PIL import Image

    tiles = vae.to_pil(x[:k])
    strip = Image.new("RGB", (k * (toy.W + 1) - 1, toy.H), "white")
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (toy.W + 1), 0))
    return strip


def figure_grid(ev, students, w_grid, path, k=3):
    """Fig. 4: a row per method, a column per w, the same k held-out prompts and noises in every cell."""
    from PIL import Image

    labels = [label for label, _ in TEACHER_ROWS] + [s["label"] for s in students]
    rows = []
    for label, method in TEACHER_ROWS:
        rows.append([_pictures(ev.sample(method, w, rows=slice(0, k))[0], k) for w in w_grid])
    for s in students:
        rows.append([_pictures(ev.sample("student", w, s, rows=slice(0, k))[0], k) for w in w_grid])
    prompts = "; ".join(toy.caption(*p.tolist()) for p in ev.prompts[:k])
    plots.image_grid(rows, path, labels, [f"w = {w:g}" for w in w_grid], cell=VIEW * (k * (toy.W + 1) - 1),
                     resample=Image.NEAREST, label_width=150)
    return path, prompts


def sweep(ev, teacher, student, ws, path_stem):
    """Fig. 5a: each score vs w for the teacher sampler, the student distilled from it and CFG."""
    series = {TEACHER_NAMES[teacher]: (teacher, None), "Euler + CFG": ("cfg", None)}
    if student is not None:
        series[student["label"]] = ("student", student)
    out = {name: {} for name in series}
    for w in tqdm(ws, desc="Fig. 5a sweep", leave=False):
        for name, (method, s) in series.items():
            out[name][w] = {k: ev.ci(100 * v if k != "fidelity" else v)
                            for k, v in ev.scores(name, method, w, s).items()}
    paths = []
    for key in ("adherence", "fidelity"):
        data = {n: (list(ws), [out[n][w][key][0] for w in ws]) for n in out}
        bars = {n: ([out[n][w][key][1] for w in ws], [out[n][w][key][2] for w in ws]) for n in out}
        path = f"{path_stem}-{key}.png"
        plots.line_plot(data, path, title=f"Fig. 5a: {key} vs w (95% CI)", xlabel="w",
                        ylabel=key + (" %" if key != "fidelity" else ""), bars=bars)
        paths.append(path)
    return out, paths


def follows_w(ev, teacher, students, path, k=6, ws=(2.0, 8.0)):
    """The students follow w: per-image RMSE between their images at w = 2 and w = 8 (same noise), next
    to their teacher's, with CIs; and a labelled picture of the teacher and the first student."""
    from PIL import Image

    teacher_label, student = TEACHER_NAMES[teacher], students[0]
    t = [ev.get(teacher_label, teacher, w) for w in ws]
    numbers = {teacher_label: ev.ci(rmse(*t))}
    for other in students:
        numbers[other["label"]] = ev.ci(rmse(*[ev.get(other["label"], "student", w, other) for w in ws]))
    s = [ev.get(student["label"], "student", w, student) for w in ws]
    rows = [[_pictures(x, k)] for x in (t[0], t[1], s[0], s[1])]
    labels = [f"{teacher_label}, w = {ws[0]:g}", f"{teacher_label}, w = {ws[1]:g}",
              f"{student['label']}, w = {ws[0]:g}", f"{student['label']}, w = {ws[1]:g}"]
    plots.image_grid(rows, path, labels, cell=VIEW * (k * (toy.W + 1) - 1), resample=Image.NEAREST, label_width=190)
    return numbers


LOG_FIELDS = ("step", "loss", "step_s", "teacher_s", "student_s")  # what the report reads of a log line


def read_training_log(path):
    """The records of a distill.py log.jsonl, each a JSON object whose LOG_FIELDS are finite numbers;
    anything else is refused naming the file and its line (main reads every log before the world is built)."""
    rows = []
    for n, line in enumerate(cli.read_text(path, f"the training log {path}").split("\n"), 1):
        if not line.strip():
            continue
        with cli.reading(path, f"the training log {path} line {n}"):
            row = json.loads(line)
        bad = next((k for k in LOG_FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), (int, float))
                    or isinstance(row.get(k), bool) or not math.isfinite(row[k])), None)
        if bad is not None:
            raise cli.InputError(f"the training log {path} line {n}: {bad} is "
                                 f"{json.dumps(row.get(bad)) if isinstance(row, dict) else 'missing'}, not a finite "
                                 f"number (distill.py writes {', '.join(LOG_FIELDS)} on every line)")
        rows.append(row)
    return rows


def training_cost(students):
    """Per student, from its log.jsonl: the median seconds per training step, split into the teacher's
    target and the student's forward + backward (distill.py logs both), and the final loss."""
    rows = []
    for s in students:
        if not os.path.isfile(s["log"]):
            continue
        log = read_training_log(s["log"])
        if not log:
            continue
        med = {k: torch.tensor([r[k] for r in log], dtype=torch.float64).median().item()
               for k in ("step_s", "teacher_s", "student_s")}
        rows.append(dict(label=s["label"], steps=len(log), final_loss=sum(r["loss"] for r in log[-50:]) / len(log[-50:]),
                         **med))
    return rows


def format_cost(rows):
    lines = ["Training cost per step (median over each student's log.jsonl; the teacher's target, then the "
             "student's forward + backward):"]
    for r in rows:
        lines.append(f"  {r['label']:<32} {r['steps']:>5} steps  {1000 * r['step_s']:7.1f} ms/step = teacher "
                     f"{1000 * r['teacher_s']:6.1f} + student {1000 * r['student_s']:6.1f}  "
                     f"(final loss, mean of the last 50 steps: {r['final_loss']:.3f})")
    return "\n".join(lines)


def loss_figure(students, path):
    """Fig. 5b: the training loss (mean per 50 steps) of each student whose log.jsonl is beside it and holds
    50 steps or more (a shorter run has no point to draw)."""
    series = {}
    for s in students:
        if not os.path.isfile(s["log"]):
            continue
        rows = read_training_log(s["log"])
        losses = [r["loss"] for r in rows]
        n = 50
        if len(rows) < n:
            continue
        series[s["label"]] = ([rows[i + n - 1]["step"] for i in range(0, len(rows) - n + 1, n)],
                              [sum(losses[i:i + n]) / n for i in range(0, len(rows) - n + 1, n)])
    if series:
        plots.line_plot(series, path, title="Fig. 5b: training loss (mean per 50 steps)", xlabel="step", ylabel="loss")
        return path
    return None


# -----------------------------------------------------------------------------
# The whole report


def report(world, students=(), out_dir="runs/toy", w=4.0, steps=20, n_seeds=2, split="test", figures=True,
           sweep_ws=None, progress=True):
    """Evaluate the teacher samplers and the students (see `load_students`) on the held-out prompts
    of `split` x n_seeds images each, print the tables and comparisons, write out_dir/report.md,
    out_dir/report.json and the figures (Fig. 5a for the w of sweep_ws, e.g. SWEEP_WS, when given).
    Returns the report as a dict."""
    os.makedirs(out_dir, exist_ok=True)
    students = load_students(students) if students and "model" not in students[0] else list(students)
    start = time.time()
    with toy.one_thread():
        ev = Evaluation(world, split, n_seeds, steps)
        n = len(ev.prompts)
        rows, comparisons, imgs = table4(ev, students, w)
        title = (f"Toy Table 4: {len(set(ev.groups.tolist()))} held-out prompts x {n_seeds} seeds = {n} images, "
                 f"{steps} steps, w = {w:g}; mean [95% CI]")
        text = [format_rows(rows, title), format_comparisons(comparisons, "Comparisons (paired, 95% CI):")]
        t3 = table3(ev, students, imgs)
        if t3:
            text.append(format_comparisons(t3, "Table 3 (ablations and LoRA students against the full TeEFusion "
                                               "student of the same teacher):"))
        out = dict(w=w, steps=steps, split=split, n_images=n, n_seeds=n_seeds, rows=rows, comparisons=comparisons,
                   table3=t3, figures={})
        if figures:
            grid, prompts = figure_grid(ev, students, GRID_WS, os.path.join(out_dir, "samples.png"))
            out["figures"]["samples"] = grid
            text.append(f"Fig. 4 {grid}: rows {', '.join([r['label'] for r in rows])}; columns w = "
                        f"{', '.join(f'{v:g}' for v in GRID_WS)}; each cell the same 3 held-out prompts ({prompts})")
            main = next((s for s in students if s["method"] == "teefusion" and s["teacher"] == "w2sd"),
                        next((s for s in students if s["method"] == "teefusion"), None))
            teacher = main["teacher"] if main else "w2sd"
            if sweep_ws:
                out["sweep"], paths = sweep(ev, teacher, main, sweep_ws, os.path.join(out_dir, "sweep"))
                out["figures"]["sweep"] = paths
                text.append("Fig. 5a " + ", ".join(paths) + ": " + format_sweep(out["sweep"]))
            if main is not None:
                same = [main] + [s for s in students if s is not main and s["teacher"] == teacher
                                 and s["method"] == "teefusion"]
                follows = follows_w(ev, teacher, same, os.path.join(out_dir, "follows-w.png"))
                out["follows_w"] = follows
                out["figures"]["follows_w"] = os.path.join(out_dir, "follows-w.png")
                text.append("Follows w (per-image RMSE between w = 2 and w = 8 from the same noise, "
                            f"{out['figures']['follows_w']}): "
                            + "; ".join(f"{k} {_ci_text(v, digits=3)}" for k, v in follows.items()))
            cost = training_cost(students)
            if cost:
                out["training_cost"] = cost
                text.append(format_cost(cost))
            loss = loss_figure([s for s in students if s["teacher"] == teacher], os.path.join(out_dir, "loss.png"))
            if loss:
                out["figures"]["loss"] = loss
                text.append(f"Fig. 5b {loss}: the training loss of the students of {TEACHER_NAMES[teacher]}")
    text.append(f"(report: {time.time() - start:.0f} s)")
    out["text"] = "\n\n".join(text)
    print(out["text"])
    cli.json_text({k: v for k, v in out.items() if k != "text"}, "the report")  # a non-finite score is not written
    atomic_json({k: v for k, v in out.items() if k != "text"}, os.path.join(out_dir, "report.json"))
    _write(os.path.join(out_dir, "report.md"), "```\n" + out["text"] + "\n```\n")
    return out


def files(out_dir, result):
    """The files `report` wrote into out_dir, from what it returned."""
    figures = [p for v in result["figures"].values() for p in (v if isinstance(v, list) else [v])]
    return [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md"), *figures]


def _owned(name):
    """The files of a report in its folder (a killed report's temporaries of them are its own)."""
    return name.startswith(("report.", "samples.png", "follows-w.png", "loss.png", "sweep-"))


def format_sweep(sweep_out):
    parts = []
    for name, by_w in sweep_out.items():
        parts.append(f"{name}: " + ", ".join(f"w {w:g} {v['adherence'][0]:.1f}%" for w, v in by_w.items()))
    return "adherence " + "; ".join(parts)


def _write(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def teacher_table(world, split="dev", n_seeds=2, w=4.0, steps=20, out_dir=None):
    """The teacher samplers alone on a split (the DEV prompts when building the world)."""
    return report(world, (), out_dir or os.path.join(world.cache_dir, f"report-{split}"), w, steps, n_seeds, split,
                  figures=False)


def check_student(path, teacher=None, flag="--student"):
    """A student file, from its header, before the world is built: a toy-world MMDiT (every key and
    shape), its method (and fusion file) and the teacher it was distilled from. Returns (method, teacher)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    toy.check_network(path, flag)
    method, _ = student_file.student_files(path)
    teacher = teacher or _metadata(path).get("teefusion_teacher")
    if teacher is None:
        raise ValueError(f"{flag} {path}: which teacher was it distilled from? (give --teacher; distill.py records it "
                         "in the file's metadata)")
    return method, samplers.canonical(teacher, samplers.TEACHERS)


# what the report writes into --out (toy_report.report)
OUTPUTS = ("report.json", "report.md", "samples.png", "sweep-adherence.png", "sweep-fidelity.png", "follows-w.png",
           "loss.png")


def main(args):
    if args.seeds < 1 or args.steps < 1:
        raise ValueError(f"--seeds {args.seeds} and --steps {args.steps} must be at least 1")
    samplers.check_w(args.w, "--w")
    cli.check_memory(8 * (args.steps + 1), f"the schedule of {args.steps} steps (its N + 1 times)", "--steps")
    for path in args.student:  # every student is checked before the world is built (or its teacher trained)
        check_student(path, args.teacher)
        log = os.path.join(os.path.dirname(path), "log.jsonl")  # its training log, read by the cost table and Fig. 5b
        if os.path.exists(log):
            read_training_log(log)
    describe_students([dict(path=p, teacher=args.teacher) for p in args.student])  # labels distinct
    toy.check_cache_dir(args.cache_dir)
    cli.not_an_input([("--out", os.path.join(args.out, name)) for name in OUTPUTS],
                     [("--student", path) for path in args.student])
    cli.output_folder(args.out, "--out")
    # the report holds, for every image, its text embedding, its noise and the images of each Table 4 row
    n = len(toy.TEST_PROMPTS if args.split == "test" else toy.DEV_PROMPTS) * args.seeds
    cfg = toy.TEACHER_CONFIG
    per_image = 4 * (toy.TOKENS * cfg.context_dim + cfg.pooled_dim + (1 + len(TEACHER_ROWS) + len(args.student))
                     * cfg.in_channels * toy.H * toy.W)
    cli.check_memory(n * per_image, f"{n} images (held-out prompts x --seeds)", "--seeds")
    with cli.FolderLock(args.out, "--out"):
        checkpoint.remove_temporaries(args.out, owned=_owned)
        world = toy.build_world(args.cache_dir)
        of = dict(students=[relaunch.digest(p)["sha256"] for p in args.student], teacher=args.teacher, w=args.w,
                  steps=args.steps, seeds=args.seeds, split=args.split, figures=not args.no_figures, sweep=args.sweep,
                  world=relaunch.digest(os.path.join(world.cache_dir, "world.json"))["sha256"])
        record = relaunch.Record(args.out, "report.record.json", of)
        if record.finished(["report"]):
            print(f"{args.out} already holds this report ({os.path.join(args.out, 'report.md')}, its files listed in "
                  f"{record.path}): nothing was written")
            return
        specs = [dict(path=p, teacher=args.teacher) for p in args.student]
        record.write("report", lambda: files(args.out, report(
            world, specs, args.out, args.w, args.steps, args.seeds, args.split, figures=not args.no_figures,
            sweep_ws=SWEEP_WS if args.sweep else None)))


if __name__ == "__main__":
    parser = cli.parser("The toy world's Table 4 (and Table 3 with several students), figures and CIs.", prog="python -m evaluation.toy_report")
    parser.add_argument("--student", action="append", default=[], help="a student .safetensors (repeatable)")
    parser.add_argument("--teacher", default=None, choices=samplers.TEACHERS,
                        help="the teacher the students were distilled from (default: from their metadata)")
    parser.add_argument("--cache-dir", default="cache/toy")
    parser.add_argument("--out", default="runs/toy")
    parser.add_argument("--split", default="test", choices=("test", "dev"))
    parser.add_argument("--seeds", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--w", type=float, default=4.0)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="Fig. 5a: every score vs w (w in SWEEP_WS)")
    cli.run(main, parser)
