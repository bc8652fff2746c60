"""
Student files: what distill.py writes, read back as (MMDiT, fusion module) for sampling.

A student is an MMDiT file (Stability layout, or a diffusers transformer folder such as the authors'
released TeEFusion model) whose safetensors metadata records how it was trained: `teefusion_method`
(one of embed.FUSIONS) and, for the methods with Eq. 7's factor, embed.SCALE_METADATA. A released
diffusers folder says `txt_align_guidance: true` in its config.json instead (Eq. 7 at 1/256). The
methods with weights of their own (distillcfg, dice) keep them in a fusion file beside the student.

    model, fusion = load_student("runs/toy/student.safetensors")
    v = samplers.student(model, context, y, y_null, w=4.0, fusion=fusion)
"""

import math
import os

import torch

from embed import DICE, FUSIONS, RELEASED_SCALE, SCALE_METADATA, SCALED, DistillCFG, make_fusion
from mmdit import load_mmdit
from run import cli


def trained_as(path):
    """(method, scale) a student file says it was trained with: safetensors metadata `teefusion_method`
    and SCALE_METADATA (written by distill.py), or, for a diffusers transformer folder, its
    config.json's `txt_align_guidance: true` (the flag of the authors' released TeEFusion pipeline,
    which computes Eq. 7 at RELEASED_SCALE). (None, None) if neither; scale None if not recorded."""
    from safetensors import safe_open

    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            data = cli.read_json(config)
            if isinstance(data, dict) and data.get("txt_align_guidance"):
                return "teefusion", RELEASED_SCALE
        path = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None, None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    scale = meta.get(SCALE_METADATA)
    if scale is not None:
        try:
            scale = float(scale)
        except ValueError:
            scale = None
        if scale is None or not math.isfinite(scale) or scale <= 0:
            raise cli.InputError(f"{path}: its {SCALE_METADATA} metadata is {meta.get(SCALE_METADATA)!r}, not a "
                                 "finite number > 0 (Eq. 7's factor of the fused term; the release's is 1/256)")
    return meta.get("teefusion_method"), scale


def student_files(path, method=None):
    """(method, fusion file or None) of a student written by distill.py, from file headers only.

    method: one of FUSIONS, else read from the student's metadata (`trained_as`). The methods
    with trained weights of their own (distillcfg, dice) keep them in a file beside the student:
    its name with "student" replaced by "fusion" (student.safetensors -> fusion.safetensors,
    student-ema -> fusion-ema, a checkpoint's ema-student -> ema-fusion)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"student: no file or folder {path!r}")
    stored, _ = trained_as(path)
    if method is None and stored is None:
        raise ValueError(f"student {path!r}: its metadata does not say how it was trained (no 'teefusion_method', "
                         f"no txt_align_guidance in config.json); name the method, one of {sorted(FUSIONS)}")
    if method is not None and stored is not None and method != stored:
        raise ValueError(f"student {path!r} was trained as {stored!r} (its metadata), not {method!r}")
    method = method or stored
    if method not in FUSIONS:
        raise ValueError(f"student {path!r}: unknown method {method!r}; choose one of {sorted(FUSIONS)}")
    if FUSIONS[method] not in (DistillCFG, DICE):
        return method, None
    name = os.path.basename(os.path.normpath(path))
    fusion = os.path.join(os.path.dirname(os.path.abspath(path)),
                          name.replace("student", "fusion") if "student" in name else "fusion.safetensors")
    if not os.path.isfile(fusion):
        raise FileNotFoundError(f"{fusion}: the {method!r} student {path} needs its trained fusion module, "
                                "which distill.py writes beside the student")
    return method, fusion


def load_student(path, method=None, device="cpu", dtype=torch.float32, w_dtype=None):
    """A student written by distill.py (or a released TeEFusion transformer): (model, fusion).

    model: the MMDiT (mmdit.load_mmdit: Stability file or diffusers folder), frozen, in `dtype`.
    fusion: the student-input module of its method (FUSIONS, from its metadata unless `method` is
    given; see `student_files`), with its trained weights when it has any, for samplers.student:
    TeEFusion(w_dtype, scale) for Eq. 7, at the scale its metadata records (RELEASED_SCALE when it
    records none, as for the authors' released weights). The fusion's own weights stay in float32 (they are tiny, and
    psi(w) is float32)."""
    from safetensors.torch import load_file

    method, fusion_file = student_files(path, method)
    if method != "teefusion" and w_dtype not in (None, torch.float32):
        raise ValueError(f"w_dtype (the rounding of 1000 w) applies to TeEFusion students, not {method!r}")
    model = load_mmdit(path, device=device, dtype=dtype).eval().requires_grad_(False)
    scale = trained_as(path)[1] if method in SCALED else None  # Eq. 7's factor it was trained with
    kwargs = dict(w_dtype=w_dtype) if method == "teefusion" else {}
    fusion = make_fusion(method, model.config, scale, **kwargs)
    if fusion_file is not None:
        fusion.load_state_dict(load_file(fusion_file))
    return model, fusion.to(device).eval().requires_grad_(False)
