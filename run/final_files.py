"""
A distillation run's final files, and why a relaunch of the same command line always finishes the run.

The final files are a pure function of the checkpoint at --steps (run/training_state.py):

    DIR/student.safetensors                the student's MMDiT (Stability layout), its run in the metadata
    DIR/fusion.safetensors                 the distillcfg / dice module, if the method has one
    DIR/student-ema.safetensors, DIR/fusion-ema.safetensors     with --ema
    DIR/lora.safetensors (lora-ema.safetensors)   instead, for --lora; in the toy world with the merged
                                           students student(-ema).safetensors (lora.save_run)
    DIR/diffusers/                         with --export-diffusers: transformer/, and the teacher's parts
                                           when it is a pipeline folder, model_index.json, README.md (sd3/export.py)
    DIR/README.md                          the model card (export.write_card)
    DIR/report.json, report.md, *.png      the toy world's report (toy_report.report), unless --no-report
    DIR/final.json                         the record of the files above (relaunch.Record): for the
                                           checkpoint they come from (its name, step and the SHA-256 of
                                           its state.json), each part's files with size and SHA-256,
                                           rewritten after each part

A relaunch with --resume whose checkpoint is at --steps (training.start_point):
  * every part of `parts` recorded in final.json for that checkpoint, its files intact: one line says
    the run is finished and where its files are, nothing is written, exit status 0 (`Finished`);
  * else the run is loaded from that checkpoint (no step is trained) and `write` writes the parts that
    are missing, or whose files do not match (killed before or while they were written), atomically,
    then exit 0. The files are those an uninterrupted run writes, byte for byte (the report's timings
    are measured again).
A larger --steps trains on, and the final files of the new last checkpoint replace the old ones.

    python -m pytest -q tests/run/test_relaunch.py -k distill
"""

import json
import os
import time

from sd3 import export
from sd3 import lora
from sd3.checkpoint import _atomic_save
from mmdit import save_mmdit
from run.relaunch import Record, digest
from run.training_state import STATE, _tensors, resume_point

RECORD = "final.json"


class Finished:
    """What start_point hands every rank when the run is already finished: the path distill.main returns."""

    def __init__(self, path):
        self.path = path


def checkpoint_identity(folder, state):
    """What the final files are a function of: the checkpoint folder (its name, step, and the digest of its
    state.json, which lists every file of the folder with its size)."""
    return {"checkpoint": os.path.basename(os.path.normpath(folder)), "step": state["step"],
            "state_sha256": digest(os.path.join(folder, STATE))["sha256"]}


def main_path(args, toy_world):
    """The path distill.main returns: the student (the EMA one with --ema), or for --lora lora.run_path."""
    if getattr(args, "lora", None) is not None:
        return lora.run_path(args, toy_world)
    return os.path.join(args.out, "student-ema.safetensors" if args.ema is not None else "student.safetensors")


def parts(args, folder, toy_world):
    """The final parts of a run, in the order `write` writes them, from its arguments and the files of its
    checkpoint folder (a fusion module's file is there when the method has one)."""
    names = []
    lora_run = getattr(args, "lora", None) is not None
    for suffix, ema in (("", ""), ("-ema", "ema-")):
        if suffix and args.ema is None:
            continue
        if lora_run:
            names += [f"lora{suffix}"] + ([f"student{suffix}"] if toy_world else [])
        else:
            names.append(f"student{suffix}")
            if os.path.isfile(os.path.join(folder, f"{ema}fusion.safetensors")):
                names.append(f"fusion{suffix}")
    if args.export_diffusers and not lora_run:
        names.append("diffusers")
    names.append("card")
    if toy_world and not args.no_report:
        names.append("report")
    return names


def finished(args, folder, state):
    """Under --out's lock, before anything heavy: `Finished` (after one line saying so) when every final part
    of the checkpoint (folder, state) is recorded and intact, else None."""
    toy_world = args.teacher is None
    record = Record(args.out, RECORD, checkpoint_identity(folder, state))
    names = parts(args, folder, toy_world)
    if not record.finished(names):
        return None
    files = sum(len(record.parts[p]) for p in names)
    print(f"{args.out} is already finished at step {state['step']}: its {files} final files are in {args.out} "
          f"(listed with their sizes and SHA-256 in {record.path}; the student: {main_path(args, toy_world)}); "
          f"nothing was written. Give --steps above {state['step']} to train on", flush=True)
    return Finished(main_path(args, toy_world))


def write(args, student, ema, base, toy_world, rank, meta):
    """The final files of a run whose newest checkpoint is at --steps, from its student and EMA (trained to,
    or loaded from, that checkpoint), on rank 0: each part of `parts` that final.json does not hold intact,
    recorded as it is written. base: a LoRA student's frozen network (None for a full student); toy_world:
    the toy.ToyWorld for the report, or None; meta: the weight files' safetensors metadata. Returns
    main_path on every rank."""
    path = main_path(args, toy_world is not None)
    if rank != 0:
        return path
    folder, state = resume_point(args.out)
    if state["step"] != args.steps:
        raise RuntimeError(f"the newest checkpoint in {args.out} is at step {state['step']}, not --steps "
                           f"{args.steps}: the final files come from the checkpoint at --steps")
    record = Record(args.out, RECORD, checkpoint_identity(folder, state))
    out = args.out
    # what the card and the files' metadata say of the run, dated by the checkpoint they come from (so that a
    # relaunch on another day writes the same files)
    info = export.run_info(args, args.steps)
    info["date"] = time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(os.path.join(folder, STATE))))
    meta = dict(meta, **{export.RUN_METADATA: json.dumps(info)})
    if base is not None:
        lora.save_run(args, student, ema, base, toy_world is not None, meta, record.write)
    else:
        for suffix, s in (("", student), ("-ema", ema)):
            if s is None:
                continue
            record.write(f"student{suffix}", lambda s=s, suffix=suffix: [
                save_mmdit(s.model, os.path.join(out, f"student{suffix}.safetensors"), metadata=meta)])
            if len(s.fusion.state_dict()):
                record.write(f"fusion{suffix}", lambda s=s, suffix=suffix: _save_fusion(
                    s.fusion, os.path.join(out, f"fusion{suffix}.safetensors"), meta))
        if args.export_diffusers:
            record.write("diffusers", lambda: _export(ema.model if ema is not None else student.model, out, args,
                                                      info))
    # the model card beside the final files: what they are, w's convention, the loaders
    record.write("card", lambda: [export.write_card(out, info, export.run_files(args, ema is not None, base is not None,
                                                                               toy_world is not None))])
    print(f"student: {path}")
    if toy_world is not None and not args.no_report:  # the toy world's Table 4, figures, CIs
        record.write("report", lambda: _report(toy_world, path, args))
    # parts() is what a relaunch checks: it must name nothing that was not written
    unwritten = [p for p in parts(args, folder, toy_world is not None) if p not in record.parts]
    if unwritten:
        raise RuntimeError(f"final parts {unwritten} were not written, but a relaunch would look for them")
    return path


def _save_fusion(fusion, path, meta):
    _atomic_save(_tensors(fusion), path, meta)
    return [path]


def _export(model, out, args, info):
    """OUT/diffusers: the student's transformer, and the teacher's parts when it is a pipeline folder
    (export.export_pipeline). Returns every file of the folder."""
    folder = os.path.join(out, "diffusers")
    how = export.export_pipeline(model, folder, args.teacher if export.is_pipeline(args.teacher) else None, info)
    parts = f", the teacher's text encoders, VAE and scheduler {how}" if how else ""
    print(f"diffusers export: {folder} (transformer/{parts}, README.md)")
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def _report(world, student, args):
    from evaluation import toy_report  # the toy world only

    return toy_report.files(args.out, toy_report.report(world, [dict(path=student, teacher=args.teacher_sampler)],
                                                        out_dir=args.out, progress=not args.no_progress))
