"""
What a distillation run ships, so that a user can load it and knows how: a model card, and a
diffusers pipeline folder that the authors' released TeEFusion pipeline loads.

    python distill.py ... --export-diffusers       # OUT/diffusers/: the pipeline folder below (+ its README.md)
    python -m sd3.export --student runs/teefusion/student.safetensors \\
        --components /models/stable-diffusion-3-medium-diffusers --out runs/teefusion/diffusers
    python -m sd3.export --card runs/teefusion/student.safetensors   # print the card of a student file

The model card (README.md), written by distill.py next to student.safetensors / lora.safetensors at the
end of a run and in every export folder, says what the weights are (the method, the teacher and its
sampler, steps, batch, learning rate, w range, data), that w is the paper's w (CFG = (1 + w) v_c -
w v_null; diffusers' guidance_scale is 1 + w; the released pipeline's guidance_scale IS w), which
loaders compute Eq. 7 (this project's generate.py; the authors' released pipeline, for a TeEFusion
student in the folder below) and which do not (stock diffusers, ComfyUI and other SD3 loaders: they
ignore txt_align_guidance and silently lose w), each with a command that runs.

The pipeline folder (export_pipeline):
    transformer/            the student in diffusers' layout (float32), config.json with txt_align_guidance:
                            true, the flag the released transformer class reads (mmdit.save_mmdit_diffusers)
    text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, vae/, scheduler/
                            the teacher's own, when the teacher is a diffusers pipeline folder (--components):
                            HARD-LINKED file by file (no extra disk space, and the folder stays whole if the
                            teacher's is deleted), copied where a hard link cannot be made (another file system)
    model_index.json        _class_name TeEFusionSD3Pipeline; transformer ["sd3_model", "SD3Transformer2DModel"],
                            the released transformer class as a diffusers custom component (the file
                            transformer/sd3_model.py, which is the authors' code under CC-BY-NC 4.0 and not
                            shipped here: the card says how to put it there); the other entries the teacher's
    README.md               the card
With a single-file teacher there are no components: transformer/ and the card, which says how to make the
folder whole (this command with --components). Stock diffusers cannot load the folder as a pipeline
(sd3_model is no diffusers class): that is deliberate, it would silently drop w; tests/sd3/test_export.py loads
it with the released pipeline's code, re-expressed on diffusers' classes, and gets generate.py's image.
"""

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file (python sd3/export.py): the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import os
import shutil
import time

from run import cli
from sd3.checkpoint import atomic_write
from sd3 import student_file

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae",
              "scheduler")  # the released pipeline's modules besides the transformer
TRANSFORMER_ENTRY = ["sd3_model", "SD3Transformer2DModel"]  # the released transformer class, a custom component
PIPELINE_CLASS = "TeEFusionSD3Pipeline"
RELEASE = "https://github.com/AIDC-AI/TeEFusion"
RUN_METADATA = "teefusion_run"  # a student file's metadata key holding run_info as JSON


# -----------------------------------------------------------------------------
# What the card says about a run


def run_info(args, step):
    """The facts of a distill.py run a card states (JSON types only; stored in the student file's
    metadata under RUN_METADATA, so a card can be written again from the file alone)."""
    toy_world = args.teacher is None
    info = dict(method=args.method, teacher=_name(args.teacher) if not toy_world else "the toy world's teacher",
                teacher_path=args.teacher, teacher_sampler=args.teacher_sampler, teacher_steps=args.teacher_steps,
                shift=args.shift, preset=args.preset if args.teacher_sampler == "zsampling" else None,
                tau=args.tau, target=args.target if args.teacher_sampler != "cfg" else None,
                fused_scale=args.fused_scale,
                step=step, steps=args.steps, global_batch=args.global_batch, lr=args.lr, w_min=args.w_min,
                w_max=args.w_max, t_sampling=args.t_sampling, ema=args.ema, toy=toy_world,
                date=time.strftime("%Y-%m-%d"), lora=None)
    if args.teacher_sampler == "w2sd":
        if args.w2sd_finetuned:
            info["w2sd"] = (f"the W2SD release's pair from the fine-tune {_name(args.w2sd_finetuned)}: strong = teacher "
                            f"{args.strong_scale:+g} delta, weak = teacher {args.weak_scale:+g} delta")
        else:
            weak = _name(args.weak) or "the toy world's weak model"
            info["w2sd"] = f"strong {_name(args.strong) or info['teacher']}, weak {weak}"
        info["w2sd"] += f", the {args.w2sd_final} model moving after the reflection"
    if getattr(args, "lora", None) is not None:
        info["lora"] = dict(rank=args.lora, alpha=args.lora_alpha, targets=args.lora_targets, full=args.lora_full,
                            base=None if toy_world else _lora_base(args))
    info["data"] = "the toy world's training prompts (toy.py)" if toy_world else args.data
    if args.data:
        try:
            with open(os.path.join(args.data, "index.json"), encoding="utf-8") as f:
                index = json.load(f)
            settings, n = index.get("settings", {}), index.get("num_samples")
            if n is not None and settings.get("resolution") is not None:
                kind = "aspect-ratio buckets" if settings.get("buckets") == "aspect" else "square crops"
                info["data"] = f"{args.data}: {n} images of about {settings['resolution']} px ({kind}, prepare.py)"
        except (OSError, ValueError, AttributeError):
            pass
    return info


def _lora_base(args):
    from sd3 import lora

    return lora.base_file(args)


def _name(path):
    return os.path.basename(os.path.normpath(path)) if path else None


SAMPLER_NAMES = {"cfg": "Euler + CFG (Eq. 2)", "zsampling": "Z-Sampling + CFG (Eq. 3-4)",
                 "w2sd": "W2SD + CFG (Eq. 3-4)"}
METHOD_NAMES = {"teefusion": "TeEFusion (Eq. 7: z = G(psi(t)) + F(y) + G(psi(1000 w)) * F(y - y_null) * s)",
                "gonly": "the \"G only\" ablation (Table 3, as the paper writes it: c + G(psi(1000 w)))",
                "gonly-scaled": "the \"G only\" ablation at Eq. 7's scale (Table 3: c + G(psi(1000 w)) * s)",
                "distillcfg": "the DistillCFG ablation (Table 3: a new guidance MLP of psi(1000 w))",
                "dice": "the DICE baseline (a text-embedding enhancer; the MMDiT unchanged)"}


# -----------------------------------------------------------------------------
# The card


def model_card(info, files, where="run", components=None, folder="FOLDER"):
    """README.md for a run's folder (where="run": `files` are the run's final files) or for an export folder
    (where="export": components = how the teacher's parts came, or None without them). folder: where the
    card goes, as the commands in it name it."""
    method, lora_spec = info.get("method"), info.get("lora")
    teacher = info.get("teacher") or "an SD3 MMDiT"
    lines = ["---", "tags:", "- teefusion", "- guidance-distillation", "- stable-diffusion-3"]
    lines += ["library_name: diffusers"] if where == "export" else []
    lines += ["---", "", f"# {'LoRA ' if lora_spec else ''}TeEFusion student of {teacher}", ""]
    lines += [f"A student distilled with {METHOD_NAMES.get(method, method)} by this project's distill.py "
              f"(Algorithm 1 of \"TeEFusion: Blending Text Embeddings to Distill Classifier-Free Guidance\", ICCV "
              "2025): it samples with ONE network pass per step, the guidance w entering through the conditioning "
              "vector instead of a second (null-prompt) pass.", ""]
    if info.get("step") is not None:
        lines += ["## Training", "", "| | |", "|---|---|"]
        rows = [("teacher", f"{teacher} ({info.get('teacher_path') or 'built in'})"),
                ("teacher sampler", f"{SAMPLER_NAMES.get(info.get('teacher_sampler'), info.get('teacher_sampler'))}, "
                                    f"its step on the {info.get('teacher_steps')}-step schedule (shift "
                                    f"{info.get('shift')})" + (f", reflection preset {info['preset']}"
                                                               if info.get("preset") else "")
                                    + (f", inversion label {info['tau']}" if info.get("tau") is not None else "")
                                    + (f", target: the {info['target']} velocity" if info.get("target") else "")),
                ("Eq. 7's scale s", None if info.get("fused_scale") is None else
                 f"{info['fused_scale']:g}" + (" (the release's 1/256)" if info["fused_scale"] == 1 / 256 else
                                               " (not the release's 1/256: the authors' pipeline cannot load it)")),
                ("W2SD pair", info.get("w2sd")),
                ("steps", f"{info.get('step')} of {info.get('steps')} optimizer steps (AdamW, lr {info.get('lr')}, "
                          f"global batch {info.get('global_batch')}, t {info.get('t_sampling')})"),
                ("w", f"drawn uniformly in [{info.get('w_min')}, {info.get('w_max')}] (the paper's w)"),
                ("data", info.get("data")), ("EMA", f"decay {info['ema']}" if info.get("ema") else None),
                ("LoRA", _describe_lora(lora_spec)), ("date", info.get("date"))]
        lines += [f"| {k} | {v} |" for k, v in rows if v is not None] + [""]
    w_range = f"on w in [{info['w_min']}, {info['w_max']}]" if info.get("w_min") is not None else "on a range of w"
    lines += ["## Guidance w: the paper's convention", "",
              "w is the paper's w everywhere: classifier-free guidance is (1 + w) v(x, t, c) - w v(x, t, null) "
              "(Eq. 2), so w = 0 is the conditional model. diffusers' `guidance_scale` is g = 1 + w (uncond + g "
              "(cond - uncond)): w = 5 is diffusers' 6. The authors' released TeEFusion pipeline is the exception: "
              f"its `guidance_scale` IS w (fed to psi as 1000 w), not 1 + w. This student was trained {w_range}; the "
              "released student samples at w = 5 with 50 steps.", ""]
    lines += _loaders(info, where, components, folder, files)
    lines += ["## Files", ""] + [f"- `{name}`: {what}" for name, what in files.items()] + [""]
    if not info.get("toy"):
        lines += ["The weights are a fine-tune of the teacher: the teacher's license applies to them. The TeEFusion "
                  f"authors' code ({RELEASE}) is under CC-BY-NC 4.0 and is not part of this folder.", ""]
    return "\n".join(lines)


def _describe_lora(spec):
    if not spec:
        return None
    return (f"rank {spec.get('rank')}, alpha {spec.get('alpha')}, adapters on {spec.get('targets')}, trained fully: "
            f"{spec.get('full')}; over {spec.get('base') or 'the toy teacher'} (diffusers' SD3 LoRA format)")


PROMPT = "a photo of a cat"
PIPELINE_FOLDER = "/models/stable-diffusion-3-medium-diffusers"  # the example's diffusers SD3 pipeline folder


def _loaders(info, where, components, folder, files):
    """The card's sections on loading: what computes Eq. 7, each with a command that runs, and what does not."""
    teacher = info.get("teacher_path") or PIPELINE_FOLDER
    lora_spec = info.get("lora")
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    out = ["## Loaders that compute Eq. 7", ""]
    if info.get("toy"):
        student = f"--lora {path('lora.safetensors')}" if lora_spec else f"--student {path('student.safetensors')}"
        out += ["This project's generate.py (the toy world: no VAE, its own text encoders), from the repository's root:",
                "", f"    python generate.py --toy --method student {student} --w 5 --steps 20 "
                "--prompt \"a red plus left of a blue square\"", "",
                "The toy world's student is no SD3 model: the released pipeline and diffusers cannot run it.", ""]
        return out + _not_loaders()
    # 1. generate.py, from the repository's root
    if where == "export":
        model = folder if components else teacher
        student = f"--student {path('transformer')}"
    elif lora_spec:
        model, student = lora_spec.get("base") or teacher, f"--lora {path('lora.safetensors')}"
    else:
        model, student = teacher, f"--student {path('student.safetensors')}"
    out += ["1. This project's generate.py, from the repository's root (for a --model that is a single file, add "
            "--text-encoders and --vae: a diffusers SD3 pipeline folder and its vae/):", "",
            f"       python generate.py --model {model} --method student {student} --w 5 --steps 50 "
            f"--prompt \"{PROMPT}\"", ""]
    if info.get("method") != "teefusion":
        return out + [f"The authors' released pipeline computes TeEFusion's Eq. 7 only: this {info.get('method')} "
                      "student runs with generate.py alone.", ""] + _not_loaders()
    # 2. the released pipeline, on a pipeline folder
    out += [f"2. The authors' released TeEFusion pipeline ({RELEASE}): its transformer class reads "
            "`txt_align_guidance: true` and adds the fused term G(psi(1000 w)) * F(y - y_null) / 256.", ""]
    target = folder if where == "export" and components else (
        path("diffusers") if where == "run" and "diffusers/" in files else "PIPELINE_OUT")
    steps = []
    if lora_spec:
        steps.append(f"python -m sd3.lora merge --base {lora_spec.get('base') or teacher} --lora {path('lora.safetensors')} "
                     f"--out {path('student.safetensors')}")
    if target == "PIPELINE_OUT":
        source = path("transformer") if where == "export" else path("student.safetensors")
        steps.append(f"python -m sd3.export --student {source} --components {PIPELINE_FOLDER} --out PIPELINE_OUT")
        out += ["   First a pipeline folder with the teacher's text encoders, tokenizers, VAE and scheduler (any "
                "diffusers SD3 pipeline folder of the same model), from this repository's root:", ""]
        out += [f"       {line}" for line in steps] + [""]
    out += [("   Then, in" if steps else "   In") + " a clone of the authors' repository (with its requirements), "
            "copy their transformer class to where the folder's model_index.json names it (transformer/sd3_model.py: "
            "their code, CC-BY-NC 4.0, not shipped here) and load the folder as their README loads their release "
            "(the commands run inside the clone: give the folder as an absolute path):", "",
            f"       git clone {RELEASE} && cd TeEFusion && pip install -r requirements.txt",
            f"       cp pipelines/sd3_model.py {target}/transformer/sd3_model.py",
            "       python -c '",
            "       import torch",
            "       from pipelines.sd3_teefusion_pipeline import TeEFusionSD3Pipeline",
            f"       pipe = TeEFusionSD3Pipeline.from_pretrained(\"{target}\", torch_dtype=torch.bfloat16, "
            "trust_remote_code=True).to(\"cuda\")",
            f"       pipe(prompt=[\"{PROMPT}\"], num_inference_steps=50, guidance_scale=5, seed=0)[0].save(\"cat.png\")"
            "  # guidance_scale IS w",
            "       '", "",
            "   Two differences from generate.py: the "
            "released pipeline forms its guidance tensor as torch.tensor((w,), dtype=transformer.dtype) * 1000, so in "
            "bf16 w = 5 enters psi as 4992 (7.5 as 7488), while training formed psi(1000 w) in float32 "
            "(generate.py --w-rounding model reproduces the bf16 rounding); and it draws the noise of all images of "
            "a call from one torch.Generator(device).manual_seed(seed) in the transformer's dtype, where generate.py "
            "draws image k from torch.Generator(\"cpu\").manual_seed(seed + k) in float32 (diffusers' convention): "
            "the same seed gives other images.", ""]
    return out + _not_loaders()


def _not_loaders():
    return ["## Loaders that do NOT compute Eq. 7", "",
            "- Stock diffusers: `SD3Transformer2DModel.from_pretrained(.../transformer)` loads the weights and "
            "ignores `txt_align_guidance` with only a warning; `StableDiffusion3Pipeline` then runs CFG on top of a "
            "network trained to guide by itself, and the images answer no w at all. (`StableDiffusion3Pipeline."
            "from_pretrained` of an export folder fails instead: its transformer is no diffusers class.)",
            "- ComfyUI, and any loader of Stability's SD3 files (student.safetensors is in that layout): the same, "
            "they know nothing of the fused term and silently lose w.", ""]


def write_card(folder, info, files, where="run", components=None):
    """FOLDER/README.md, atomically."""
    path = os.path.join(folder, "README.md")
    text = model_card(info, files, where, components, folder)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
    return path


def run_files(args, ema, lora_run, merged):
    """{file name: what it is} of a finished distill.py run's folder (the card's file list)."""
    suffixes = [""] + (["-ema"] if ema else [])
    files = {}
    for s in suffixes:
        label = " (the EMA weights)" if s else ""
        if lora_run:
            files[f"lora{s}.safetensors"] = f"the adapter{label}: diffusers' SD3 LoRA format"
        if not lora_run or merged:
            files[f"student{s}.safetensors"] = (f"the student{label}: the MMDiT in Stability's layout, its metadata "
                                                "naming the method, the teacher sampler and the step")
        if args.method in ("distillcfg", "dice"):
            files[f"fusion{s}.safetensors"] = f"the {args.method} module{label}, which the student needs"
    if args.export_diffusers:
        files["diffusers/"] = "the student as a diffusers pipeline folder (its own README.md)"
    files["log.jsonl"] = "one line per training step: loss, lr, gradient norm, seconds"
    return files


# -----------------------------------------------------------------------------
# The pipeline folder


def is_pipeline(folder):
    return folder is not None and os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "model_index.json"))


def check_components(folder, flag="--teacher"):
    """A diffusers SD3 pipeline folder holding every part the released pipeline needs (before any work)."""
    if not is_pipeline(folder):
        raise FileNotFoundError(f"{flag} {folder}: not a diffusers pipeline folder (no model_index.json)")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise FileNotFoundError(f"{flag} {folder} lacks {', '.join(missing)}: the exported pipeline needs every one of "
                                f"{', '.join(COMPONENTS)}")
    return folder


def _place(src, dst):
    """dst as a hard link to src (renamed into place: atomic, and the source's permissions untouched), else an
    atomic copy. Returns "linked" or "copied"."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-link-{os.getpid()}"
    try:
        os.link(src, tmp)  # follows a symlink (the Hub's cache holds them): links the file itself
        os.replace(tmp, dst)
        return "linked"
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    return "copied"


def export_pipeline(model, folder, components=None, info=None):
    """`folder` as a pipeline folder of the student `model` (an MMDiT): transformer/ in diffusers' layout
    with txt_align_guidance, the teacher's parts from `components` (a diffusers SD3 pipeline folder, or None)
    hard-linked or copied, model_index.json, README.md. Returns how the parts came ("hard-linked",
    "copied", "hard-linked and copied") or None."""
    from mmdit import save_mmdit_diffusers

    if components is not None and os.path.realpath(folder) == os.path.realpath(components):
        raise ValueError(f"the export folder {folder} is the teacher's own folder: it would overwrite its transformer")
    save_mmdit_diffusers(model, os.path.join(folder, "transformer"), extra_config={"txt_align_guidance": True})
    how = None
    if components is not None:
        check_components(components, "components")
        with open(os.path.join(components, "model_index.json"), encoding="utf-8") as f:
            teacher_index = json.load(f)
        done = set()
        for part in COMPONENTS:
            root = os.path.join(components, part)
            for here, _, names in os.walk(root, followlinks=True):
                for name in sorted(names):
                    src = os.path.join(here, name)
                    done.add(_place(src, os.path.join(folder, part, os.path.relpath(src, root))))
        how = {frozenset({"linked"}): "hard-linked", frozenset({"copied"}): "copied"}.get(frozenset(done),
                                                                                          "hard-linked and copied")
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": teacher_index.get("_diffusers_version", "0.30.0"),
                 "transformer": TRANSFORMER_ENTRY}
        index.update({part: teacher_index.get(part) for part in COMPONENTS})
        _json(index, os.path.join(folder, "model_index.json"))
    files = {"transformer/": "the student in diffusers' layout, float32; config.json has txt_align_guidance: true"}
    if how:
        files.update({f"{part}/": f"the teacher's, {how} from {components}" for part in COMPONENTS})
        files["model_index.json"] = (f"_class_name {PIPELINE_CLASS}; transformer {TRANSFORMER_ENTRY} (the released "
                                     "class: copy the authors' sd3_model.py into transformer/), the rest the teacher's")
    else:
        files["(no components)"] = ("the teacher was no diffusers pipeline folder: add its text encoders, "
                                    "tokenizers, VAE and scheduler with `python -m sd3.export --components PIPELINE` "
                                    "(its card shows how)")
    write_card(folder, info or {"method": "teefusion"}, files, "export", how)
    return how


def _json(obj, path):
    from sd3.checkpoint import atomic_json

    atomic_json(obj, path, indent=2)


# -----------------------------------------------------------------------------
# Command line: a pipeline folder (or a card) from a student file


def stored_info(path):
    """run_info stored in a student file's metadata (distill.py writes it), or a minimal one."""

    method, _ = student_file.student_files(path)
    info = {"method": method}
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if RUN_METADATA in meta:
            info.update(json.loads(meta[RUN_METADATA]))
    return info


def check_export_folder(out, inputs):
    """--out before any work: not one of the inputs nor a folder holding one ((flag, path) pairs), and new,
    empty, or an earlier export (its transformer/config.json has txt_align_guidance): an export never
    replaces a run's files (its README.md card, its student) nor anything else already there."""
    for flag, path in inputs:
        if path and os.path.exists(path) and (cli.same_file(out, path) or cli.inside(path, out)):
            raise cli.InputError(f"--out {out} holds {flag} {path}: the export would write over what it reads; give "
                                 "another --out")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    config = os.path.join(out, "transformer", "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            earlier = json.load(f).get("txt_align_guidance") is True
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        names = sorted(os.listdir(out))
        raise cli.InputError(f"--out {out} already holds files that are no export of this command "
                             f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): an export writes "
                             "transformer/, README.md and the pipeline's parts there; give a new or empty folder")


def main(args):
    if args.card and (args.student or args.out or args.components):
        raise ValueError("--card PATH prints a student file's card and exports nothing: give it alone, or drop it "
                         "to export (--student, --out, --components)")
    if args.card:
        if not os.path.exists(args.card):
            raise FileNotFoundError(f"--card {args.card}: no such file")
        if os.path.isfile(args.card) and not args.card.endswith(".safetensors"):
            raise ValueError(f"--card {args.card}: not a student file (a .safetensors written by distill.py, whose "
                             "metadata the card is made from)")
        print(model_card(stored_info(args.card), {os.path.basename(args.card): "the student"},
                         folder=os.path.dirname(args.card) or "."))
        return None
    if args.student is None or args.out is None:
        raise ValueError("give --student PATH and --out FOLDER (and --components PIPELINE), or --card PATH")
    if not os.path.exists(args.student):
        raise FileNotFoundError(f"--student {args.student}: no such file or folder")
    if args.components is not None:
        check_components(args.components, "--components")
        if os.path.realpath(args.out) == os.path.realpath(args.components):
            raise ValueError(f"--out {args.out} is --components: the export would overwrite the teacher's transformer")
    info = stored_info(args.student)
    if info["method"] != "teefusion":
        raise ValueError(f"--student {args.student} is a {info['method']} student: the txt_align_guidance format holds "
                         "TeEFusion students only (use generate.py with the student file)")
    check_export_folder(args.out, [("--student", args.student), ("--components", args.components)])
    cli.output_folder(args.out, "--out")
    import mmdit

    model = mmdit.load_mmdit(args.student)
    how = export_pipeline(model, args.out, args.components, info)
    print(f"pipeline folder: {args.out} ({'components ' + how if how else 'transformer only'}; README.md)")
    return args.out


def build_parser():
    p = cli.parser("A TeEFusion student as a diffusers pipeline folder with a model card, or its card alone.", prog="python -m sd3.export")
    p.add_argument("--student", help="student.safetensors (distill.py), or a diffusers transformer folder")
    p.add_argument("--components", help="a diffusers SD3 pipeline folder: its text encoders, tokenizers, VAE and "
                                        "scheduler are hard-linked (or copied) into --out")
    p.add_argument("--out", help="the pipeline folder to write")
    p.add_argument("--card", metavar="PATH", help="print the model card of a student file instead")
    return p


if __name__ == "__main__":
    cli.run(main, build_parser())
