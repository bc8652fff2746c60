"""
The paper's evaluation protocols (TeEFusion Tables 1-4, Fig. 4-5) on top of the scorers of
evaluation/metrics.py and evaluation/fid.py: score a folder of images against its prompts, FID statistics of a folder,
the speed table, the w-sweep, tables (Markdown + JSON) and figures (PNG).

    protocol          what it runs                                               output
    score             one metric over a folder (images in sorted file-name       mean, per-image JSON
                      order, one prompt per line / JSON entry)
    fid-stats, fid    Inception pool3 statistics of a folder; FID of two .npz    .npz, FID value
    speed             every sampler of samplers.py on the same model, noise and  Table 4's NFE and
                      prompt; the fastest of `repeats` runs counts                wall time, ratios
    table4            generate.py for every method and student (same prompts     Table 4 (.md, .json),
                      and seeds; resumable), then NFE, s / image, scores;        grid.png; with
                      --w-sweep every guided row at every w                      --w-sweep Fig. 5a, 4
    w_sweep           any generate(method, w, prompts) over methods x w, scored   Fig. 5a (sweep_plot),
                      by any metrics, in memory                                  Fig. 4 (image_grid)
    plot-loss         loss vs step of distill.py's log                           Fig. 5b

The building blocks take a generate function or folders of images, so that a protocol that
generates with SD3 only has to write the images: `score_folder(scorer, folder, prompts)`,
`folder_statistics(inception, folder)`, `w_sweep(generate, metrics, prompts, methods, ws)`,
`write_table(rows, stem)`. Scorers come from `metrics.load_scorer(metric, ...)`; every metric's
formula and preprocessing is in evaluation/metrics.py's docstring, FID's resize conventions in evaluation/fid.py's.
Prompt sets from local files: plain lists, the HPS v2 benchmark (4 styles), DPG-Bench, COCO captions.
The toy world reports its own adherence and agreement scores in toy.py.

ABSENT (not built; nothing here pretends to compute them):
  - a VQA model for DPG-Bench (mPLUG); `dpg.dpg_bench` takes yours, and the CLI has no dpg command;
  - numeric parity with the released checkpoints (CLIP-L, PickScore, HPS, ImageReward, the aesthetic
    MLP, the FID Inception): the tests check each formula, preprocessing and key mapping on tiny
    random models, not against the real weights (none can be downloaded here).

Bad input (a missing folder or file, an empty prompt file, as many prompts as images or not, a
metric without its weights) is refused with one `error:` line and exit status 2 before any model
loads (run/cli.py).

    python evaluate.py convert-hps /weights/HPS_v2.1_compressed.pt --tokenizer /weights/clip-vit-large-patch14 \
        --out /weights/hps-v2.1
    python evaluate.py score --metric hps --clip /weights/hps-v2.1 --images out/ --prompts prompts.txt
    python evaluate.py score --metric aesthetic --clip /weights/clip-vit-large-patch14 \
        --aesthetic /weights/sac+logos+ava1-l14-linearMSE.safetensors --images out/
    python evaluate.py score --metric imagereward --imagereward /weights/ImageReward.pt \
        --clip /weights/bert-base-uncased --images out/ --prompts prompts.txt
    python evaluate.py fid-stats --inception pt_inception.safetensors --images out/ --out ours.npz
    python evaluate.py fid ours.npz coco_ref.npz
    python evaluate.py speed --mmdit /weights/sd3_medium.safetensors --res 1024 --steps 50 --w 5
    python evaluate.py speed                       # a tiny random MMDiT on the CPU
    python evaluate.py table4 --model /weights/stable-diffusion-3-medium-diffusers --prompts prompts.txt \
        --methods cfg,zsampling,w2sd --w2sd-finetuned /weights/sd3_finetune.safetensors \
        --student teefusion=runs/teefusion/student.safetensors --score hps=/weights/hps-v2.1 \
        --w 5 --steps 50 --out runs/table4            # add --w-sweep 1,2,3,5,7,9 for Fig. 5a
                                                      # --student NAME=lora.safetensors: a LoRA student
    python evaluate.py plot-loss runs/log.jsonl --out loss.png
    python evaluate.py plot-sweep results.json --metric hps --out sweep.png

table4 on many GPUs: the same command under torchrun. Every row's images are shared out across the ranks
as generate.py shares them (each image made by one rank, the same as in one process); after the last row,
rank 0 alone scores them and writes the tables and figures. A kill of the whole job is resumed by the same
command line: the images already made are kept, and a table or figure whose bytes do not change is not
rewritten (a finished table4 relaunched writes nothing). The other commands run in one process.
    torchrun --nproc_per_node 8 evaluate.py table4 --model /weights/stable-diffusion-3-medium-diffusers ...
"""

import argparse
import csv
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sd3 import checkpoint
from run import cli
from evaluation import fid
import generate
from sd3 import lora
from evaluation import metrics
from run import ranks
import samplers
from generate import load_prompts, write_text  # prompt files live with the generator
from evaluation.plots import image_grid, line_plot

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -----------------------------------------------------------------------------
# Prompt sets from local files


HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def load_hps_prompts(folder):
    """HPS v2 benchmark: {style: [800 prompts]} from folder/{anime,concept-art,paintings,photo}.json."""
    out = {}
    for style in HPS_STYLES:
        path = os.path.join(folder, f"{style}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HPS v2 benchmark: no file {path!r} (expected {', '.join(HPS_STYLES)} .json "
                                    f"files, each a list of prompts, in {folder!r})")
        out[style] = load_prompts(path)
    return out


def load_dpg_prompts(folder):
    """DPG-Bench: {item_id: prompt} from folder/*.txt (the benchmark's prompts/ folder)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DPG-Bench prompts: {folder!r} is not a folder (expected one <item_id>.txt each)")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            path = os.path.join(folder, name)
            out[name[:-4]] = cli.read_text(path, f"DPG-Bench prompt {path}").strip()
    if not out:
        raise FileNotFoundError(f"DPG-Bench prompts: no .txt files in {folder!r}")
    return out


def load_coco_captions(path, per_image=1):
    """COCO captions_*.json -> [(image_id, caption)], the first `per_image` captions of each image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO captions: no file {path!r} (expected captions_val2014.json or similar)")
    data = cli.read_json(path, f"COCO captions {path}")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise cli.MissingKey(f"COCO captions: {path!r} has no 'annotations' list")
    seen, out = {}, []
    for n, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise ValueError(f"COCO captions {path}: annotation {n} has no string 'caption' and 'image_id'")
        if seen.get(a["image_id"], 0) < per_image:
            seen[a["image_id"]] = seen.get(a["image_id"], 0) + 1
            out.append((a["image_id"], a["caption"].strip()))
    return out


def list_images(folder):
    """The image files of a folder in sorted file-name order (the order prompts are matched in)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"images: {folder!r} is not a folder of {'/'.join(IMAGE_SUFFIXES)} files")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder!r}")
    for n in names:  # each file's header, before any scorer loads: an empty or foreign file is named here
        path = os.path.join(folder, n)
        cli.regular_file(path, f"images: {path}")
        try:
            with Image.open(path):
                pass
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise cli.InputError(f"images: {path} is not a readable image ({type(e).__name__}: {e})") from None
    return [os.path.join(folder, n) for n in names]


def open_images(paths):
    """Image files -> RGB PIL images."""
    return [Image.open(p).convert("RGB") for p in paths]


# -----------------------------------------------------------------------------
# Scoring folders of images (what any generate step writes)


def score_folder(scorer, folder, prompts=None, batch=32, desc="score"):
    """(file names, (N,) per-image scores) of scorer(images, prompts) (metrics.load_scorer) over the
    images of `folder` in sorted file-name order, `batch` images open at a time."""
    paths = list_images(folder)
    if prompts is not None and len(prompts) != len(paths):
        raise ValueError(f"{len(paths)} images in {folder!r} but {len(prompts)} prompts")
    scores = [torch.as_tensor(scorer(open_images(paths[i:i + batch]),
                                     None if prompts is None else prompts[i:i + batch])).float()
              for i in tqdm(range(0, len(paths), batch), desc)]
    return [os.path.basename(p) for p in paths], torch.cat(scores)  # (N,)


def folder_statistics(inception, folder, batch=50):
    """FID statistics (mu, sigma) of the images of `folder`: inception(images) -> (B, 2048) features."""
    paths = list_images(folder)
    feats = torch.cat([inception(open_images(paths[i:i + batch])).double().cpu()
                       for i in tqdm(range(0, len(paths), batch), "Inception")])  # (N, 2048)
    return fid.feature_statistics(feats.numpy())


# -----------------------------------------------------------------------------
# Speed: NFE and wall time per image of every sampler, same model, noise and prompt


def speed_table(model, noise, context, y, context_null, y_null, *, w, steps, methods=None, strong=None,
                weak=None, repeats=1, warmup_steps=2, **kwargs):
    """Rows {method, nfe, wall_s (per image), nfe_ratio, wall_ratio} (ratios to the student).

    Every method runs on the same noise (B, C, H, W) and conditioning; methods run in turns,
    `repeats` times, and the fastest run counts (load on a shared machine only adds time).
    W2SD runs only with both a strong and a weak model (`methods` defaults to those that can run).
    """
    if methods is None:
        methods = [m for m in samplers.METHODS if m != "w2sd" or (strong is not None and weak is not None)]
    methods = [samplers.canonical(m, samplers.METHODS) for m in methods]
    if "student" not in methods:
        raise ValueError("speed_table reports ratios to the student: include 'student' in methods")
    device, B = noise.device, noise.shape[0]

    def run(method, n):
        return samplers.sample(method, model, noise, context, y, context_null, y_null,
                               w=None if method == "euler" else w, steps=n, strong=strong, weak=weak, **kwargs)

    for m in methods:  # warm-up (kernels, allocator)
        run(m, warmup_steps)
    wall, nfe = {m: math.inf for m in methods}, {}
    for _ in tqdm(range(repeats), "speed", disable=repeats < 2):
        for m in methods:
            generate.synchronize(device)
            t0 = time.perf_counter()
            x0, nfe[m] = run(m, steps)
            generate.synchronize(device)
            wall[m] = min(wall[m], (time.perf_counter() - t0) / B)
            if not torch.isfinite(x0).all():
                raise RuntimeError(f"speed_table: {m} produced non-finite latents")
    return [dict(method=m, nfe=nfe[m], wall_s=wall[m], nfe_ratio=nfe[m] / nfe["student"],
                 wall_ratio=wall[m] / wall["student"]) for m in methods]


# -----------------------------------------------------------------------------
# The w-sweep (Fig. 4 and 5a): every method at every w, scored by every metric


def w_sweep(generate, scorers, prompts, methods, ws):
    """results {method: {w: {metric: mean score}}} and images {method: {w: images}}.

    generate(method, w, prompts) -> images for those prompts (same seeds for every method and w,
    e.g. a closure over samplers.sample, vae.decode and fixed noise); scorers: {metric name:
    fn(images, prompts) -> (B,) per-image scores} (metrics.load_scorer). The first image of each
    (method, w) feeds `image_grid`.
    """
    results, images = {}, {}
    for method in methods:
        for w in tqdm(ws, f"w-sweep {method}"):
            x = generate(method, w, prompts)
            images.setdefault(method, {})[w] = x
            results.setdefault(method, {})[w] = {
                name: metrics.aggregate(torch.as_tensor(fn(x, prompts)), name) for name, fn in scorers.items()}
    return results, images


# -----------------------------------------------------------------------------
# Tables (Markdown + JSON)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def markdown_table(rows, columns=None):
    """rows: list of dicts -> a Markdown table (columns default to the keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows, stem, columns=None, title=None):
    """Writes stem.md and stem.json (the same rows); returns the Markdown text."""
    md = (f"### {title}\n\n" if title else "") + markdown_table(rows, columns)
    text = cli.json_text({"title": title, "rows": rows}, f"the table {stem}", indent=2)  # finite numbers only
    write_text(stem + ".md", md)
    write_text(stem + ".json", text + "\n")
    return md


# -----------------------------------------------------------------------------
# Figures with pillow: line plots (Fig. 5a, 5b) and image grids (Fig. 4)


def read_log(path, key="loss"):
    """(steps, values) of `key` from a training log: .jsonl (one dict per line with "step") or .csv
    with a header that has "step" and `key`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log: no file {path!r} (expected .jsonl lines with 'step' and {key!r}, or a .csv)")
    text = cli.read_text(path, f"log {path}")
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                with cli.reading(path, f"log {path} line {n}"):
                    rows.append((n, json.loads(line)))
    else:
        rows = list(enumerate(csv.DictReader(text.splitlines()), 2))  # line 1 is the header
    rows = [(n, r) for n, r in rows if isinstance(r, dict) and r.get(key) not in (None, "")
            and r.get("step") not in (None, "")]
    if not rows:
        raise cli.MissingKey(f"log: {path!r} has no rows with both 'step' and {key!r}")
    steps, values = [], []
    for n, r in rows:
        try:
            step, value = float(r["step"]), float(r[key])
        except (TypeError, ValueError):
            step = value = math.nan
        if not (math.isfinite(step) and math.isfinite(value)):
            raise ValueError(f"log {path} line {n}: step {r['step']!r}, {key} {r[key]!r}: not finite numbers")
        steps.append(step)
        values.append(value)
    return steps, values


def sweep_plot(results, metric, path):
    """Fig. 5a: results {method: {w: {metric: value}}} (JSON keys may be strings) -> score vs w."""
    if not isinstance(results, dict) or not all(
            isinstance(by_w, dict) and all(isinstance(v, dict) for v in by_w.values()) for by_w in results.values()):
        raise ValueError("sweep results: expected JSON {method: {w: {metric: value}}}")
    series = {}
    for method, by_w in results.items():
        try:
            pts = sorted((float(w), float(v[metric])) for w, v in by_w.items() if metric in v)
        except (TypeError, ValueError):
            raise ValueError(f"sweep results: {method}'s w and {metric!r} values are not all numbers") from None
        if not all(math.isfinite(x) and math.isfinite(y) for x, y in pts):
            raise ValueError(f"sweep results: {method}'s w or {metric!r} values are not all finite")
        if pts:
            series[method] = ([p[0] for p in pts], [p[1] for p in pts])
    if not series:
        raise cli.MissingKey(f"no {metric!r} values in the sweep results")
    return line_plot(series, path, title=f"{metric} vs guidance w", xlabel="w", ylabel=metric)


# -----------------------------------------------------------------------------
# Table 4 and Fig. 5a: generate.py for every method and student on the same prompts and seeds,
# then NFE, seconds per image and scores. It lives here, with the other protocols, and calls
# generate.check / generate.run per row: all rows are checked before anything loads, generation is
# resumable (images already there are skipped), and the scorers load only after generation is done.

W2SD_ONLY = dict(strong=None, weak=None, w2sd_finetuned=None, w2sd_main=False)


def score_specs(specs):
    """--score METRIC=WEIGHTS -> {metric: metrics.load_scorer arguments}, checked (nothing loads).
    WEIGHTS: the CLIP-type folder (clip, clip-dice, pickscore, hps); CLIP_FOLDER,MLP.safetensors
    (aesthetic); ImageReward.pt,BERT_TOKENIZER_FOLDER (imagereward)."""
    out = {}
    for spec in specs:
        metric, _, weights = spec.partition("=")
        parts = weights.split(",")
        pair = {"aesthetic": ("clip", "aesthetic"), "imagereward": ("imagereward", "clip")}.get(metric, ("clip",))
        if not weights or len(parts) != len(pair):
            raise ValueError(f"--score {spec!r}: expected {metric}={','.join(n.upper() for n in pair)} (weights paths)")
        out[metric] = dict(zip(pair, parts))
        metrics.check_weights(metric, **out[metric])
    return out


def table_plans(args):
    """[(label, w, generate.Plan)]: each method of --methods and each --student (NAME=PATH or PATH), at
    each w of --w-sweep (else --w; euler once, without w), into --out/LABEL[/wW], every one checked."""
    ws = [args.w]
    if args.w_sweep is not None:
        try:
            ws = [float(w) for w in args.w_sweep.split(",")]
        except ValueError:
            raise ValueError(f"--w-sweep {args.w_sweep!r}: expected comma-separated numbers, e.g. 1,2,3,5") from None
        for w in ws:
            cli.finite(w, "--w-sweep", low=0, why="the paper's guidance w, Eq. 2")
    rows = [(m, samplers.canonical(m, samplers.METHODS), None) for m in args.methods.split(",") if m]
    for spec in args.student or []:
        name, _, path = spec.rpartition("=")
        if not path:
            raise ValueError(f"--student {spec!r}: no file after '=' (NAME=PATH or PATH)")
        rows.append((name or "student " + os.path.basename(os.path.dirname(os.path.abspath(path))), "student", path))
    labels = [label for label, _, _ in rows]
    if not rows or len(set(labels)) < len(labels):
        raise ValueError(f"table4 needs --methods and/or --student rows with distinct names, got {labels}")
    plans = []
    for label, method, student in rows:
        for w in [None] if method == "euler" else ws:
            ns = argparse.Namespace(**{**vars(args), **({} if method == "w2sd" else W2SD_ONLY)})
            ns.method, ns.student, ns.w = method, student, w
            if student is not None and lora.is_adapter_file(student):  # a LoRA student over --model (sd3/lora.py)
                ns.student, ns.lora = None, student
            ns.w_rounding = args.w_rounding if method == "student" else "float32"
            sub = f"w{w:g}" if args.w_sweep and w is not None else ""
            ns.out = os.path.join(args.out, "".join(c if c.isalnum() or c in "-_." else "_" for c in label), sub)
            plans.append((label, w, generate.check(ns)))
    return plans


def pixels(height, width):
    """An image size for a title: "1024px" for a square, "1216x832px" (width x height) otherwise."""
    return f"{height}px" if height == width else f"{width}x{height}px"


TABLE4_OUTPUTS = ("table4.md", "table4.json", "grid.png", "sweep.json", "sweep-grid.png")


def _table4_owned(name):
    """The files table4 writes in its own --out (each row's folder is generate.py's)."""
    return name.startswith(("table4.", "grid.png", "sweep"))


def cmd_table4(args):
    cli.at_least(args.grid_prompts, 1, "--grid-prompts", why="prompts (columns) in OUT/grid.png")
    scorers = score_specs(args.score or [])
    cli.not_an_input([("--out", os.path.join(args.out, n)) for n in TABLE4_OUTPUTS], [("--prompts", args.prompts)]
                     + [(f"--score {m}", p) for m, spec in scorers.items() for p in spec.values()])
    plans = table_plans(args)
    with ranks.Ranks(plans[0][2].device) as group:  # under torchrun: the job's processes; else this one
        lock = cli.FolderLock(args.out, "--out").acquire() if group.rank == 0 else None
        try:
            if group.rank == 0:
                checkpoint.remove_temporaries(args.out, owned=_table4_owned)
            records = {(label, w): generate.run(plan, group=group) for label, w, plan in plans}
            if group.rank == 0:  # the scores, once, after every rank made its images
                _table4_report(args, scorers, plans, records)
        finally:
            if lock is not None:
                lock.release()


def _table4_report(args, scorers, plans, records):
    rows = [dict(method=label, w="-" if plan.record["w"] is None else plan.record["w"], NFE=records[label, w][0]["nfe"],
                 s_per_image=sum(r["seconds"] for r in records[label, w]) / len(records[label, w]))
            for label, w, plan in plans]
    device = plans[0][2].device
    for metric, weights in scorers.items():  # one scorer in memory at a time, after generation
        scorer = metrics.load_scorer(metric, device=device, **weights)
        for row, (label, w, plan) in zip(rows, plans):
            prompts = [r["prompt"] for r in records[label, w]]  # file-name order = job order
            row[metric] = metrics.aggregate(score_folder(scorer, os.path.join(plan.args.out, "images"), prompts,
                                                         desc=f"{metric} {label}")[1], metric)
        del scorer
        generate.free_memory(device)
    first = plans[0][2]
    title = (f"{len(first.prompts)} prompts x {first.args.n_per_prompt} images, {first.args.steps} steps, "
             f"{pixels(*first.size)}, seed {first.args.seed}")
    print(write_table(rows, os.path.join(args.out, "table4"), title=f"Table 4: {title}"))
    by_label = {}  # label -> {w: (plan, records)}
    for label, w, plan in plans:
        by_label.setdefault(label, {})[w] = (plan, records[label, w])

    def pictures(plan, recs, n):  # the first image of each of the first n prompts
        return open_images([os.path.join(plan.args.out, r["file"]) for r in recs if r["image_index"] == 0][:n])

    cells = [pictures(*next(iter(ws.values())), args.grid_prompts) for ws in by_label.values()]
    image_grid(cells, os.path.join(args.out, "grid.png"), list(by_label), first.prompts[:args.grid_prompts])
    if args.w_sweep:  # Fig. 5a (score vs w) and Fig. 4 (methods x w, the first prompt)
        results = {}
        for row, (label, w, plan) in zip(rows, plans):
            if w is not None:
                results.setdefault(label, {})[w] = {k: row[k] for k in ("NFE", "s_per_image", *scorers)}
        write_text(os.path.join(args.out, "sweep.json"), cli.json_text(results, "the w-sweep", indent=2) + "\n")
        for metric in scorers:
            sweep_plot(results, metric, os.path.join(args.out, f"sweep-{metric}.png"))
        ws = sorted({w for r in results.values() for w in r})
        image_grid([[pictures(*by_label[label][w], 1)[0] for w in ws] for label in results],
                   os.path.join(args.out, "sweep-grid.png"), list(results), [f"w = {w:g}" for w in ws])


# -----------------------------------------------------------------------------
# Command line: every argument is checked before any model loads


def remove_temporaries_of(*paths):
    """Before a command writes these files: the temporaries a killed run of it left of them (one line says so)."""
    for path in paths:
        name = os.path.basename(path)
        checkpoint.remove_temporaries(os.path.dirname(os.path.abspath(path)), owned=lambda n, name=name: n == name)


def cmd_score(args):
    cli.at_least(args.batch, 1, "--batch", why="images scored at once")
    cli.check_device(args.device)
    paths = list_images(args.images)
    prompts = None
    if args.metric != "aesthetic":
        if not args.prompts:
            raise ValueError(f"--metric {args.metric} needs --prompts (one per image, in sorted file-name order)")
        prompts = load_prompts(args.prompts)
        if len(prompts) != len(paths):
            raise ValueError(f"{len(paths)} images in {args.images!r} but {len(prompts)} prompts in {args.prompts!r}")
    metrics.check_weights(args.metric, clip=args.clip, aesthetic=args.aesthetic, imagereward=args.imagereward)
    if args.out:
        cli.output_file(args.out, "--out", suffixes=(".json",), inputs=[("--prompts", args.prompts)]
                        + [("--images", p) for p in paths]
                        + [(f"--{f}", getattr(args, f)) for f in ("clip", "aesthetic", "imagereward")])
        remove_temporaries_of(args.out)
    scorer = metrics.load_scorer(args.metric, clip=args.clip, aesthetic=args.aesthetic,
                                 imagereward=args.imagereward, device=args.device)
    names, scores = score_folder(scorer, args.images, prompts, args.batch, desc=args.metric)
    result = metrics.aggregate(scores, args.metric)
    out = {"metric": args.metric, "score": result, "per_image": dict(zip(names, scores.tolist()))}
    text = cli.json_text(out, f"the {args.metric} scores", indent=2)  # non-finite scores: a failure, nothing out
    print(json.dumps({"metric": args.metric, "images": len(names), "score": result}))
    if args.out:
        write_text(args.out, text + "\n")


def cmd_fid_stats(args):
    cli.at_least(args.batch, 1, "--batch", why="images through the Inception network at once")
    cli.check_device(args.device)
    fid.check_inception(args.inception)
    paths = list_images(args.images)
    if len(paths) < 2:
        raise ValueError(f"--images {args.images!r}: FID statistics need at least 2 images, found {len(paths)}")
    cli.output_file(args.out, "--out", suffixes=(".npz",), inputs=[("--inception", args.inception)]
                    + [("--images", p) for p in paths])
    remove_temporaries_of(args.out)
    net = fid.load_inception(args.inception, args.device, args.resize)
    mu, sigma = folder_statistics(net, args.images, args.batch)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise cli.Failure(f"the Inception features of {args.images} are not all finite: nothing written to {args.out}")
    fid.save_statistics(args.out, mu, sigma)
    print(json.dumps({"images": len(paths), "resize": args.resize, "out": args.out}))


def cmd_speed(args):
    import mmdit
    for flag in ("mmdit", "strong", "weak"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag}: no file or folder {path!r}")
    if (args.strong is None) != (args.weak is None):
        raise ValueError("W2SD needs both --strong and --weak (or neither: the table then leaves W2SD out)")
    if args.strong and not args.mmdit:
        raise ValueError("--strong/--weak need --mmdit (the random tiny default has no weak/strong pair)")
    height, width = args.height or args.res, args.width or args.res
    for flag in ("steps", "batch", "repeats", "tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be at least 1")
    samplers.check_w(args.w, "--w")
    cli.check_seed(args.seed)
    device = cli.check_device(args.device)
    cli.check_memory(8 * (args.steps + 1), f"the schedule of {args.steps} steps (its N + 1 times)", "--steps")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if not os.path.basename(args.out) or args.out.endswith(("/", os.sep)):
        raise cli.InputError(f"--out {args.out!r}: an output stem (STEM.md and STEM.json are written), not a folder")
    # the model's size, from the headers: its position table bounds --res, its widths the memory of the inputs
    cfg = mmdit.read_config(args.mmdit) if args.mmdit else mmdit.CONFIGS["tiny-sd3"]
    for path in (args.strong, args.weak):
        if path and mmdit.read_config(path) != cfg:
            raise ValueError(f"W2SD's pair must be --mmdit's architecture: {path} is another MMDiT")
    unit = 8 * cfg.patch_size  # pixels per patch side
    for flag, side in (("--height" if args.height else "--res", height), ("--width" if args.width else "--res", width)):
        if side < unit or side % unit or side > unit * cfg.pos_embed_max_size:
            raise ValueError(f"{flag} {side}: must be a positive multiple of {unit} (the VAE's 8 x the MMDiT's "
                             f"{cfg.patch_size} x {cfg.patch_size} patches) and at most {unit * cfg.pos_embed_max_size} "
                             f"(its position table holds {cfg.pos_embed_max_size} x {cfg.pos_embed_max_size} patches)")
    # at least the inputs and one block's qkv for the (B, image + text tokens) rows of CFG's batch of 2
    L = (height // unit) * (width // unit) + args.tokens
    nbytes = args.batch * 4 * (2 * L * 3 * cfg.hidden_size + 2 * args.tokens * cfg.context_dim)
    cli.check_memory(nbytes, f"a batch of {args.batch} at {pixels(height, width)} with {args.tokens} text tokens",
                     "--batch, --res (--height, --width) or --tokens", device)
    inputs = [("--" + f, getattr(args, f)) for f in ("mmdit", "strong", "weak")]
    for suffix in (".md", ".json"):  # last: the only check that may create a folder (the one the stem goes into)
        cli.output_file(args.out + suffix, "--out", inputs=inputs)
    remove_temporaries_of(args.out + ".md", args.out + ".json")
    if args.mmdit:
        load = lambda p: mmdit.load_mmdit(p, device, dtype).eval().requires_grad_(False)  # noqa: E731
        model = load(args.mmdit)
        strong, weak = (load(args.strong) if args.strong else None), (load(args.weak) if args.weak else None)
    else:  # a tiny random MMDiT: the cost of a forward does not depend on its weights
        torch.manual_seed(0)
        model = mmdit.MMDiT(mmdit.CONFIGS["tiny-sd3"]).to(device, dtype).eval().requires_grad_(False)
        strong = weak = None
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, cfg.in_channels, height // 8, width // 8, generator=g).to(device)  # (B, C, H, W)
    # random conditioning of the right shapes: the cost does not depend on the prompt
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g).to(device, dtype)  # (B, L, Dc)
    y = torch.randn(args.batch, cfg.pooled_dim, generator=g).to(device, dtype)  # (B, Dy)
    context_null = torch.randn(1, args.tokens, cfg.context_dim, generator=g).to(device, dtype)
    y_null = torch.randn(1, cfg.pooled_dim, generator=g).to(device, dtype)
    rows = speed_table(model, noise, context, y, context_null, y_null, w=args.w, steps=args.steps,
                       strong=strong, weak=weak, repeats=args.repeats)
    title = f"speed: {args.steps} steps, w = {args.w}, {pixels(height, width)}, batch {args.batch}, {device.type}"
    print(write_table(rows, args.out, title=title))


def main(args):
    if ranks.from_environment()[1] > 1 and args.command != "table4":
        raise ValueError(f"evaluate.py {args.command} runs in one process; under torchrun only table4 shares its "
                         "work (its images) across the ranks")
    if args.command == "score":
        cmd_score(args)
    elif args.command == "fid":
        for path in args.stats:
            fid.check_statistics(path)
        stats = [fid.load_statistics(path) for path in args.stats]  # each checked: finite, mu (D,), sigma (D, D)
        print(cli.json_text({"fid": fid.frechet_distance(*stats[0], *stats[1])}, "the FID"))
    elif args.command == "convert-hps":
        cli.not_an_input([("--out", args.out)], [("the checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)])
        cli.output_folder(args.out, "--out", create=False)  # writable, before the conversion's work
        print(metrics.convert_openclip(args.checkpoint, args.tokenizer, args.out))
    elif args.command == "fid-stats":
        cmd_fid_stats(args)
    elif args.command == "speed":
        cmd_speed(args)
    elif args.command == "table4":
        cmd_table4(args)
    elif args.command == "plot-loss":
        cli.output_file(args.out, "--out", suffixes=(".png",), inputs=[("the log", args.log)])
        steps, values = read_log(args.log, args.key)
        remove_temporaries_of(args.out)
        line_plot({args.key: (steps, values)}, args.out, title=f"{args.key} vs step", xlabel="step", ylabel=args.key)
    elif args.command == "plot-sweep":
        if not os.path.isfile(args.results):
            raise FileNotFoundError(f"results: no file {args.results!r} (expected JSON {{method: {{w: {{metric: v}}}}}})")
        cli.output_file(args.out, "--out", suffixes=(".png",), inputs=[("the results", args.results)])
        results = cli.read_json(args.results, f"results {args.results}")
        remove_temporaries_of(args.out)
        try:
            sweep_plot(results, args.metric, args.out)
        except ValueError as e:  # what is wrong in the file, with its name
            raise type(e)(f"results {args.results}: {e}") from None


def build_parser():
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = sub.add_parser("score", help="one metric of a folder of images (the mean and, with --out, per image)")
    p.add_argument("--metric", required=True, choices=metrics.METRICS)
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (with tokenizer files); "
                   "for imagereward: the BERT tokenizer folder")
    p.add_argument("--imagereward", help="ImageReward.pt (for --metric imagereward)")
    p.add_argument("--aesthetic", help="LAION aesthetic MLP .safetensors (for --metric aesthetic)")
    p.add_argument("--images", required=True, help="folder of images, scored in sorted file-name order")
    p.add_argument("--prompts", help=".txt/.json/.jsonl prompts, one per image in sorted file-name order")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default=device)
    p.add_argument("--out", help="JSON file for the per-image scores")
    p = sub.add_parser("fid", help="Frechet distance between two .npz statistics files (mu, sigma)")
    p.add_argument("stats", nargs=2)
    p = sub.add_parser("convert-hps", help="open_clip checkpoint (HPS v2/v2.1, ViT-g-14) -> transformers folder")
    p.add_argument("checkpoint")
    p.add_argument("--tokenizer", required=True, help="an OpenAI CLIP tokenizer folder (openai/clip-vit-*)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("fid-stats", help="Inception pool3 statistics (mu, sigma) of a folder of images, as .npz")
    p.add_argument("--inception", required=True, help="FID Inception weights (.safetensors, pytorch-fid names)")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resize", default="pytorch-fid", choices=fid.RESIZE,
                   help="resize to 299 as pytorch-fid (default) or as the TensorFlow graph (evaluation/fid.py docstring)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default=device)
    p = sub.add_parser("speed", help="NFE and wall time per image of every sampler, ratios to the student")
    p.add_argument("--mmdit", help="MMDiT checkpoint (default: a tiny random MMDiT)")
    p.add_argument("--strong", help="strong model for W2SD")
    p.add_argument("--weak", help="weak model for W2SD")
    p.add_argument("--res", type=int, default=256, help="a square image's side in pixels (default 256)")
    p.add_argument("--height", type=int, help="image height in pixels (default --res)")
    p.add_argument("--width", type=int, help="image width in pixels (default --res)")
    p.add_argument("--tokens", type=int, default=333, help="text tokens (SD3: 333)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--w", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default=device)
    p.add_argument("--out", default="speed", help="output stem: writes STEM.md and STEM.json")
    p = sub.add_parser("table4", help="Table 4 (Fig. 5a with --w-sweep): generate.py for every method and student "
                       "on the same prompts and seeds; NFE, s / image and scores as Markdown + JSON; a grid")
    generate.add_arguments(p, exclude=("--method", "--student", "--lora"))
    p.set_defaults(lora=None)
    p.set_defaults(out="runs/table4")
    p.add_argument("--methods", default="cfg,zsampling,w2sd", help="teacher rows, comma-separated (euler, cfg, "
                   "zsampling, w2sd; w2sd needs --weak or --w2sd-finetuned)")
    p.add_argument("--student", action="append", help="a student row, NAME=PATH or PATH (repeat for several)")
    p.add_argument("--score", action="append", help="METRIC=WEIGHTS (repeat): hps=HPS_FOLDER, pickscore=FOLDER, "
                   "clip=FOLDER, clip-dice=FOLDER, aesthetic=CLIP_FOLDER,MLP.safetensors, "
                   "imagereward=ImageReward.pt,BERT_FOLDER")
    p.add_argument("--w-sweep", help="comma-separated w values (Fig. 5a): every guided row at each w")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts (columns) in OUT/grid.png")
    p = sub.add_parser("plot-loss", help="loss vs step from distill.py's log (Fig. 5b)")
    p.add_argument("log")
    p.add_argument("--key", default="loss")
    p.add_argument("--out", default="loss.png")
    p = sub.add_parser("plot-sweep", help="score vs w from a results JSON {method: {w: {metric: v}}} (Fig. 5a)")
    p.add_argument("results")
    p.add_argument("--metric", required=True)
    p.add_argument("--out", default="sweep.png")
    return parser


if __name__ == "__main__":
    cli.run(main, build_parser())
