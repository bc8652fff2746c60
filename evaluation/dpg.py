"""
DPG-Bench scoring (Hu et al. 2024; the paper's Table 2): 1,065 dense prompts, each with yes/no
questions that depend on one another, asked of a 2 x 2 grid of images per prompt by a VQA model:

    a question scores 1 when the VQA answers "yes", 0 otherwise, and 0 whenever a question it
    depends on scored 0; a tile's score is the mean over its questions, a prompt's the mean over
    its tiles, the benchmark's the mean over prompts x 100 (and per level-1 category)

The VQA model is yours to plug in (`vqa(image, question) -> str`; the benchmark uses mPLUG-large,
which is not part of this project):

    from evaluation import dpg
    out = dpg.dpg_bench("images/", "dpg_bench.csv", my_vqa)   # {item_id}.png: 2 x 2 grids of 512 px
    print(out["overall"], out["categories"])
"""

import csv
import dataclasses
import os

from PIL import Image
from tqdm import tqdm

from run import cli


@dataclasses.dataclass(frozen=True)
class Question:
    qid: int
    text: str
    parents: tuple  # qids that must be answered "yes" for this one to count (0 = none)
    category: str  # level-1 category (category_broad)


def load_dpg_questions(path):
    """DPG-Bench's dpg_bench.csv -> {item_id: [Question, ...] sorted by qid}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DPG-Bench: no file {path!r} (expected dpg_bench.csv with columns item_id, "
                                f"proposition_id, dependency, category_broad, question)")
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"item_id", "proposition_id", "dependency", "category_broad", "question"}
        if not need <= set(reader.fieldnames or ()):
            raise cli.MissingKey(f"DPG-Bench: {path!r} lacks columns "
                                 f"{sorted(need - set(reader.fieldnames or ()))}")
        for row in reader:
            parents = tuple(int(p) for p in str(row["dependency"]).replace(" ", "").split(",") if p not in ("", "0"))
            out.setdefault(row["item_id"], []).append(
                Question(int(row["proposition_id"]), row["question"], parents, row["category_broad"]))
    for qs in out.values():
        qs.sort(key=lambda q: q.qid)
    return out


def split_tiles(image, tile):
    """A grid image (the benchmark's 2 x 2 of `tile`-pixel images) -> its tiles, row-major."""
    W, H = image.size
    if W % tile or H % tile:
        raise ValueError(f"DPG-Bench: image {W}x{H} is not a grid of {tile}x{tile} tiles")
    return [image.crop((c, r, c + tile, r + tile)) for r in range(0, H, tile) for c in range(0, W, tile)]


def dpg_scores(tile_image, questions, vqa):
    """{qid: 0/1} for one tile: 1 where the VQA answers "yes"; then a question whose parent
    scored 0 scores 0 (in qid order, so zeros propagate down a chain)."""
    scores = {q.qid: float(vqa(tile_image, q.text).strip().lower() == "yes") for q in questions}
    for q in questions:
        if any(scores.get(p, 1.0) == 0 for p in q.parents):
            scores[q.qid] = 0.0
    return scores


def dpg_bench(images, questions, vqa, tile=512):
    """DPG-Bench score with a pluggable vqa(image, question) -> str.

    images: {item_id: PIL image (a grid of tiles)} or a folder of {item_id}.png; questions:
    load_dpg_questions output or the CSV path. Per prompt: mean over tiles of the mean over its
    questions. Returns {"overall": mean over prompts x 100, "categories": {level-1 category:
    mean over all (prompt, tile, question) of that category x 100}, "per_prompt": {...}}.
    """
    if isinstance(questions, (str, os.PathLike)):
        questions = load_dpg_questions(questions)
    per_prompt, cat_sum, cat_n = {}, {}, {}
    for item_id, qs in tqdm(sorted(questions.items()), "DPG-Bench"):
        if isinstance(images, dict):
            if item_id not in images:
                raise cli.MissingKey(f"DPG-Bench: no image for prompt {item_id!r}")
            image = images[item_id]
        else:
            path = os.path.join(images, f"{item_id}.png")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"DPG-Bench: no image {path!r} for prompt {item_id!r}")
            image = Image.open(path).convert("RGB")
        tile_means = []
        for t in split_tiles(image, tile):
            scores = dpg_scores(t, qs, vqa)
            tile_means.append(sum(scores.values()) / len(scores))
            for q in qs:
                cat_sum[q.category] = cat_sum.get(q.category, 0.0) + scores[q.qid]
                cat_n[q.category] = cat_n.get(q.category, 0) + 1
        per_prompt[item_id] = 100 * sum(tile_means) / len(tile_means)
    return {"overall": sum(per_prompt.values()) / len(per_prompt),
            "categories": {c: 100 * cat_sum[c] / cat_n[c] for c in sorted(cat_sum)},
            "per_prompt": per_prompt}
