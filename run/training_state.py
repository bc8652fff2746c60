"""
A distillation run on disk: its checkpoints, how a relaunch finds where to resume, and what is
never written. run/training.py (the run around Algorithm 1's loop) calls these; they hold no training logic.

    DIR/checkpoints/step-0000500/student.safetensors   the MMDiT, Stability layout (save_mmdit)
                                 adapter.safetensors   instead, for a LoRA student (--lora): its trained
                                                       tensors by parameter name (lora.trainable_state)
                                 fusion.safetensors    distillcfg / dice modules (if any)
                                 ema-*.safetensors     with --ema
                                 optimizer.safetensors AdamW moments, by parameter name
                                 state.json            step, vars(args), optimizer settings, and every
                                                       file of the folder with its size: written LAST
    DIR/checkpoints/latest                             {"checkpoint": "step-0000500", "step": 500}

Every file is written to NAME.tmp-XXXX and renamed (atomic_write), so a kill -9 at any moment
leaves whole files only. A folder is complete once its state.json parses and lists files that are
all there with their sizes; `latest` is written after it. `resume_point` trusts `latest` when it
names a complete folder, and otherwise falls back to the newest complete one (with a warning);
pruning keeps the newest COMPLETE checkpoints; `remove_temporaries` deletes what a kill left.
Only finite weights are written (`non_finite`, checked by distill.py before every save), and
`newest_finite_checkpoint` reads the tensors back from disk rather than trusting any pointer.

No pickle anywhere: safetensors and JSON only. python -m pytest -q tests/test_distill.py
"""

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from run import cli
from sd3 import lora
from sd3.checkpoint import TEMPORARY, _atomic_save, atomic_json, atomic_write  # TEMPORARY: NAME.tmp-XXXX[.suffix]
from mmdit import STABILITY_PREFIX, save_mmdit

LATEST = "latest"  # DIR/checkpoints/latest: {"checkpoint": "step-NNNNNNN", "step": N}, written last
STATE = "state.json"  # written last inside a checkpoint folder, listing its files
STEP_FOLDER = re.compile(r"step-(\d+)")


def _tensors(module):
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def optimizer_tensors(optimizer, names):
    """AdamW's state as flat tensors keyed by parameter name, and its settings as JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[i]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"names": names, "param_groups": groups}


def load_optimizer_tensors(optimizer, names, tensors, meta):
    if meta["names"] != names:
        raise ValueError("the checkpoint's optimizer holds other parameters than this run trains "
                         f"({len(meta['names'])} vs {len(names)}): was --method changed?")
    state = {}
    for i, name in enumerate(names):
        keys = [k for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1:]]
        if keys:
            state[i] = {k[len(name) + 1:]: tensors[k] for k in keys}
    groups = [{**g, "params": list(range(len(names)))} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def replica_checksums(params, distributed, world_size):
    """Per rank, (sum w, sum w^2) over the trained weights in float64; DDP keeps the replicas
    bitwise equal, and a checkpoint refuses to be written when they are not."""
    mine = torch.stack([sum(p.detach().double().sum() for p in params),
                        sum(p.detach().double().square().sum() for p in params)])  # (2,)
    if not distributed:
        return [mine.tolist()]
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    if not all(torch.equal(every[0], e) for e in every):
        raise RuntimeError(f"the DDP replicas disagree (checksums {[e.tolist() for e in every]})")
    return [e.tolist() for e in every]


def save_checkpoint(out, step, student, ema, optimizer, names, args, keep, replicas=None, meta=None):
    """Write DIR/checkpoints/step-N/ file by file (each atomic), state.json last (listing every
    file and its size: the folder is complete once state.json is there), then point `latest` at
    it, then prune (prune_checkpoints). A folder of the same name left by an earlier, killed run
    is removed first. meta: the safetensors metadata of the weight files."""
    root = os.path.join(out, "checkpoints")
    name = f"step-{step:07d}"
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    meta = meta or {"step": str(step)}
    _save_model(student.model, folder, "", meta)
    if len(student.fusion.state_dict()):
        _atomic_save(_tensors(student.fusion), os.path.join(folder, "fusion.safetensors"), meta)
    if ema is not None:
        _save_model(ema.model, folder, "ema-", meta)
        if len(ema.fusion.state_dict()):
            _atomic_save(_tensors(ema.fusion), os.path.join(folder, "ema-fusion.safetensors"), meta)
    tensors, opt_meta = optimizer_tensors(optimizer, names)
    _atomic_save(tensors, os.path.join(folder, "optimizer.safetensors"), {"format": "pt"})
    files = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
    atomic_json({"step": step, "files": files, "args": vars(args), "optimizer": opt_meta,
                 "replica_checksums": replicas,
                 "random_state": "counter-based: the noise of stream position p comes from a generator seeded "
                                 "by (seed, p); the step number is the whole random state"},
                os.path.join(folder, STATE))  # last in the folder: it makes the folder complete
    atomic_json({"checkpoint": name, "step": step}, os.path.join(root, LATEST))  # LAST: the commit point
    prune_checkpoints(root, step, keep)
    return folder


def model_file(model, prefix=""):
    """The file name of a student's weights in a checkpoint: the MMDiT, or a LoRA student's trained tensors."""
    return prefix + ("adapter.safetensors" if lora.is_lora(model) else "student.safetensors")


def _save_model(model, folder, prefix, meta):
    path = os.path.join(folder, model_file(model, prefix))
    if lora.is_lora(model):
        _atomic_save(lora.trainable_state(model), path, meta)
    else:
        save_mmdit(model, path, metadata=meta)


def _load_model(model, folder, prefix):
    path = os.path.join(folder, model_file(model, prefix))
    if lora.is_lora(model):
        lora.load_trainable(model, _read_tensors(path), path)
    else:
        _load_mmdit_tensors(model, path)


def checkpoint_state(folder):
    """(state.json's content, None) if the folder is a complete checkpoint: state.json present and
    parseable, its step that of the folder's name, and every file it lists present with the size it
    lists (checkpoints written before state.json listed its files: student and optimizer present).
    Otherwise (None, what is wrong)."""
    path = os.path.join(folder, STATE)
    if not os.path.isdir(folder):
        return None, "does not exist"
    try:
        with open(path) as f:
            state = json.load(f)
        own = f"step-{state['step']:07d}" == os.path.basename(os.path.normpath(folder))
    except FileNotFoundError:
        return None, f"has no {STATE} (written last: the checkpoint was never finished)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"has a corrupt {STATE} ({type(e).__name__}: {e})"
    if not own:
        return None, f"has the {STATE} of step {state['step']}, not of its own name"
    files = state.get("files") or dict.fromkeys(("student.safetensors", "optimizer.safetensors"))
    for name, size in files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return None, f"lacks {name}, which {STATE} lists"
        if size is not None and os.path.getsize(file) != size:
            return None, f"has {name} of {os.path.getsize(file)} bytes, not the {size} that {STATE} lists"
    return state, None


def checkpoint_folders(root):
    """[(step, folder)] of the step-N folders under root, newest first (by step, not by name)."""
    found = [(int(m[1]), os.path.join(root, d)) for d in (os.listdir(root) if os.path.isdir(root) else ())
             if (m := STEP_FOLDER.fullmatch(d)) and os.path.isdir(os.path.join(root, d))]
    return sorted(found, reverse=True)


def complete_checkpoints(root):
    """[(step, folder, state)] of the complete checkpoints under root, newest first."""
    found = [(step, folder, checkpoint_state(folder)[0]) for step, folder in checkpoint_folders(root)]
    return [c for c in found if c[2] is not None]


def prune_checkpoints(root, step, keep):
    """After step `step` was written (under the lock: no other writer): keep the newest keep - 1
    complete checkpoints of earlier steps, delete the other earlier ones and every incomplete folder
    (what a killed run left); complete folders of later steps, left by an earlier life of the run,
    stay until this run writes those steps again."""
    kept = 0
    for s, folder in checkpoint_folders(root):
        if s == step:
            continue
        complete = checkpoint_state(folder)[0] is not None
        if complete and s < step and kept < keep - 1:
            kept += 1
        elif not complete or s < step:
            shutil.rmtree(folder, ignore_errors=True)


def read_pointer(root):
    """What `latest` under root names: ((folder, state), None) if it names a complete checkpoint,
    (None, what is wrong) if not, and (None, None) when there is no `latest`."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None, None
    try:
        with open(pointer) as f:
            name = json.load(f).get("checkpoint")
    except (OSError, ValueError, AttributeError) as e:
        return None, f"the checkpoint pointer {pointer} is corrupt ({type(e).__name__}: {e})"
    if not (isinstance(name, str) and STEP_FOLDER.fullmatch(name)):
        return None, f"the checkpoint pointer {pointer} is corrupt (it names no step-N folder: {name!r})"
    folder = os.path.join(root, name)
    state, why = checkpoint_state(folder)
    return ((folder, state), None) if state is not None else (None, f"{pointer} points at {folder}, which {why}")


def latest_checkpoint(out):
    """The folder `latest` points to if it is a complete checkpoint, else None."""
    found, _ = read_pointer(os.path.join(out, "checkpoints"))
    return found[0] if found else None


def resume_point(out):
    """The checkpoint a --resume continues from: (folder, state), or None to start from the teacher.
    `latest` when it names a complete checkpoint. When it does not (a missing, corrupt or incomplete
    folder, or a corrupt `latest`: nothing a kill can do, since `latest` is written last, but a
    hand, a copy or a disk can), the newest complete checkpoint, with a warning naming what was
    wrong; and when there is no complete checkpoint to fall back to, a refusal: the run's committed
    state is gone, and silently starting again from the teacher would pass for a resume. No
    `latest` at all: the newest complete checkpoint if any (a kill between a first checkpoint's
    state.json and its pointer), else None (a kill before the first checkpoint was finished)."""
    root = os.path.join(out, "checkpoints")
    found, problem = read_pointer(root)
    if found:
        return found
    complete = complete_checkpoints(root)
    if complete:
        _, folder, state = complete[0]
        if problem:
            cli.warn(f"{problem}: resuming from the newest complete checkpoint, {folder}")
        return folder, state
    if problem:
        raise cli.InputError(f"{problem}, and {root} holds no complete checkpoint to fall back to: nothing to "
                             f"resume (move {root} away to start again from the teacher)")
    return None


def remove_temporaries(out):
    """Delete the temporary files (NAME.tmp-XXXX, see checkpoint.atomic_write) that a killed run left
    anywhere under out; only while holding out's lock, when no writer can be using them. Returns
    their paths."""
    removed = []
    for folder, _, files in os.walk(out):
        for name in files:
            if TEMPORARY.search(name):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return sorted(removed)


def _file_tensors(path):
    """(name, tensor) of a safetensors file, one at a time; a clear error naming the file if it
    cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError
        raise cli.InputError(f"{path} cannot be read ({cli.one_line(e)})") from e


def _read_tensors(path):
    return dict(_file_tensors(path))


def _load_mmdit_tensors(model, path):
    sd = {k[len(STABILITY_PREFIX):]: v for k, v in _read_tensors(path).items()}
    model.load_state_dict(sd, strict=True)


# The settings that define a run's draws (seed, batch, w range, t sampling), its target (the teacher's
# sampler and schedule) and its optimizer: resuming with another value would silently train a mixture.
# Free to change on resume: --steps (upwards), --micro-batch, the world size, --ckpt-every, --keep, the
# devices and dtypes, the file paths, the monitoring flags.
RUN_SETTINGS = ("seed", "global_batch", "w_min", "w_max", "t_sampling", "lr", "weight_decay", "clip_grad", "ema",
                "teacher_sampler", "target", "teacher_steps", "teacher_step", "shift", "preset", "w_inv", "tau",
                "w_weak", "w_strong", "strong_scale", "weak_scale", "main_scale", "w2sd_final")


def _shown(value):
    return "(not given)" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def check_resume(folder, state, args):
    """Refuse, before anything heavy, a resume that cannot continue this run from `folder`."""
    trained = state.get("args", {})
    for flag in ("method", "fused_scale", "lora", "lora_alpha", "lora_targets", "lora_full"):  # LoRA's normalised
        if trained.get(flag) != getattr(args, flag, None):
            raise ValueError(f"{folder} was trained with --{flag.replace('_', '-')} {trained.get(flag)}, not "
                             f"{getattr(args, flag, None)}")
    for flag in RUN_SETTINGS:  # what Algorithm 1 draws and learns from: a resumed run keeps it (checkpoints of
        if flag in trained and trained[flag] != getattr(args, flag, None):  # earlier versions may lack a key)
            raise ValueError(f"{folder} was trained with --{flag.replace('_', '-')} {_shown(trained[flag])}, not "
                             f"{_shown(getattr(args, flag, None))}: a resumed run keeps the settings it started with "
                             "(give the same, or another --out for a new run)")
    ema = "ema-" + ("adapter" if getattr(args, "lora", None) is not None else "student") + ".safetensors"
    if args.ema is not None and not os.path.exists(os.path.join(folder, ema)):
        raise ValueError(f"{folder} has no EMA weights: it was trained without --ema")
    step = state["step"]  # at --steps: the run is finished, or its final files are to be completed (run/final_files.py)
    if args.steps < step:
        raise ValueError(f"--steps {args.steps} is below the step of the checkpoint to resume, {step} ({folder}): "
                         f"give --steps above {step}, or another --out")


def load_checkpoint(folder, state, student, ema, optimizer, names):
    """Restore weights, EMA and optimizer state from a checkpoint folder (checked by check_resume);
    refuses non-finite weights. Returns the step."""
    _load_model(student.model, folder, "")
    if len(student.fusion.state_dict()):
        student.fusion.load_state_dict(_read_tensors(os.path.join(folder, "fusion.safetensors")))
    if ema is not None:
        _load_model(ema.model, folder, "ema-")
        if len(ema.fusion.state_dict()):
            ema.fusion.load_state_dict(_read_tensors(os.path.join(folder, "ema-fusion.safetensors")))
    load_optimizer_tensors(optimizer, names, _read_tensors(os.path.join(folder, "optimizer.safetensors")),
                           state["optimizer"])
    bad = non_finite([("student", student), ("EMA", ema)])
    if bad:
        raise cli.InputError(f"{folder} holds non-finite weights ({bad}): delete that folder to resume from the "
                             "checkpoint before it")
    return state["step"]


def non_finite(modules):
    """The name of the first parameter or buffer with a non-finite entry among (label, module)
    pairs (None modules skipped), or None when every one is finite. A sharded module (--fsdp):
    this rank's shard of each tensor (the callers gather every rank's answer)."""
    for label, module in modules:
        for name, p in (module.state_dict().items() if module is not None else ()):
            p = p.to_local() if isinstance(p, DTensor) else p
            if p.is_floating_point() and not torch.isfinite(p).all():
                return f"{label} {name}"
    return None


def newest_finite_checkpoint(out):
    """The newest complete checkpoint under out whose every tensor (weights, EMA, fusion module,
    AdamW moments) is finite, read from disk tensor by tensor; or None."""
    for _, folder, state in complete_checkpoints(os.path.join(out, "checkpoints")):
        files = [os.path.join(folder, f) for f in state.get("files") or os.listdir(folder) if f.endswith(".safetensors")]
        try:
            if all(torch.isfinite(v).all() for f in files for _, v in _file_tensors(f)):
                return folder
        except cli.InputError:
            continue
    return None


def last_good(out, rank):
    """The end of a non-finite message: the newest checkpoint whose tensors are finite on disk
    (read and checked by rank 0)."""
    if rank != 0:
        return "rank 0 names the newest checkpoint with finite weights"
    good = newest_finite_checkpoint(out)
    return f"the newest checkpoint with finite weights is {good}" if good else \
        "no checkpoint with finite weights was written yet"


def _trim_log(path, step):
    """After a resume from `step`, drop log lines of steps that will be trained again (and a last
    line cut short by a kill)."""
    if not os.path.exists(path):
        return
    lines = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    lines.append(line)
            except (json.JSONDecodeError, KeyError):
                pass

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)

    atomic_write(path, write)


