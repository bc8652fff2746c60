"""
LoRA students: Algorithm 1 distilled into low-rank adapters on a frozen SD3 MMDiT, so that a
TeEFusion student trains on one GPU and ships as a small file that loads over the SD3 weights.

Each adapted Linear layer W (out x in, bias b) of the student computes (standard LoRA)

    y = W x + b + (alpha / r) B A x          A (r, in), B (out, r), r the rank

A is drawn as nn.Linear draws its weight (kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in))) and B is 0,
so the untrained student IS its base network, output for output. The frozen weights are the base
network's own tensors (`attach` shares them, it copies none): with a bf16 teacher the student costs
its adapters only. TeEFusion's Eq. 7 (embed.py) is unchanged: G = t_embedder and F = y_embedder are
the network's own modules, adapted, trained fully or frozen like any other (`--lora-targets`,
`--lora-full`). The adaLN layers read z; MMDiT.adaln calls them as modules, so an adapter on them
is honoured also where samplers.student_steps computes every step's adaLN outputs at once.

Defaults (measured on the toy world's DEV prompts, README "LoRA students"): adapters on the attention
(qkv, proj), MLP (fc1, fc2) and adaLN layers of both streams, and G and F trained fully. Eq. 7's fused
term G(psi(w)) * F(y - y_null) / 256 starts tiny; with G and F frozen the student's images did not
change with w at all, and without the adaLN adapters it stayed further from its teacher.

The fused qkv (rows [q; k; v]) holds THREE adapters, one per projection: lora_A (3r, in) stacks
A_q, A_k, A_v and lora_B (3 out/3, r) stacks B_q, B_k, B_v, and the layer adds [B_q A_q x; B_k A_k x;
B_v A_v x]. That is what diffusers' SD3 format holds (to_q, to_k, to_v, each with its own lora_A and
lora_B), key for key. One rank-r adapter on the fused layer (A shared) would be the special case
A_q = A_k = A_v; three independent ones are not a rank-r LoRA of the fused layer (their sum is rank
3r), so this file never pretends they are.

Files (safetensors only):
    lora.safetensors   the adapter under diffusers' SD3 LoRA names, transformer.<module>.lora_A.weight
                       and .lora_B.weight (the scale alpha / r folded into lora_B: diffusers' own
                       convention when a file carries no alphas, so any SD3 LoRA loader reads it as
                       written); G and F when trained fully (--lora-full embedders), as exact
                       full-rank pairs: the smaller side an identity, the other the weight change,
                       lora_B.bias the bias change (`full_rank_pair`). The metadata names the method,
                       teacher sampler, step and settings (`teefusion_lora`). float32, or bf16 with
                       --lora-dtype bf16 (half the size; checkpoints keep float32 for resuming).
    StableDiffusion3Pipeline.load_lora_weights(path) / SD3Transformer2DModel.load_lora_adapter(path,
    prefix="transformer") read it (tests/sd3/test_lora.py: same output as ours to 1e-5).

    python distill.py --lora 8 --out runs/toy-lora            # the toy world: lora + merged student
    python -m sd3.lora merge --base sd3_medium.safetensors --lora runs/lora/lora.safetensors --out student.safetensors
        (the merged file records the SHA-256 of its inputs: the same merge relaunched writes nothing)
    python -m sd3.lora count --config sd3-medium --rank 16        # trainable parameters, file size
    python generate.py --model SD3 --method student --lora runs/lora/lora.safetensors --prompt "..."
"""

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file (python sd3/lora.py): the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import copy
import itertools
import json
import math
import os
import re
from contextlib import ExitStack

import torch
import torch.nn as nn
import torch.nn.functional as F_  # F is the paper's pooled-text embedder

from sd3 import checkpoint
from run import cli
from run import relaunch
from sd3.checkpoint import CheckpointError
from mmdit import CONFIGS, MMDiT, load_mmdit, read_config, save_mmdit

# what --lora-targets / --lora-full name: regular expressions over the MMDiT's (Stability) module names
BLOCK = r"joint_blocks\.\d+\.(?:x_block|context_block)\."
TARGETS = {
    "qkv": BLOCK + r"attn2?\.qkv",  # both streams (and SD3.5-medium's attn2): to_q/k/v, add_q/k/v_proj
    "proj": BLOCK + r"attn2?\.proj",  # to_out.0, to_add_out
    "fc1": BLOCK + r"mlp\.fc1",  # ff.net.0.proj, ff_context.net.0.proj
    "fc2": BLOCK + r"mlp\.fc2",  # ff.net.2, ff_context.net.2
    "adaln": rf"(?:{BLOCK}|final_layer\.)adaLN_modulation\.1",  # norm1(_context).linear, norm_out.linear
    "embedders": r"[ty]_embedder\.mlp\.[02]",  # G and F (time_text_embed.*)
    "context_embedder": r"context_embedder",
    "final": r"final_layer\.linear",  # proj_out
}
# the defaults, chosen on the toy world's DEV prompts (README, "LoRA students"): adapters on the adaLN layers
# (which read z) and G and F trained fully (which make z) let the student follow w; without either it did not
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2", "adaln")
FULL = {"embedders": r"[ty]_embedder"}  # what --lora-full may train fully, as whole modules
DEFAULT_FULL = ("embedders",)
PREFIX = "transformer."  # diffusers' SD3 LoRA files name the transformer's tensors under it
METADATA = "teefusion_lora"  # safetensors metadata: the settings, as JSON
INDEX_JSON = "diffusion_pytorch_model.safetensors.index.json"  # a sharded diffusers transformer's index
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the students a LoRA file can hold: the methods with no modules of their own (embed.FUSIONS: DistillCFG adds an
# MLP that is no part of SD3, DICE adapts no network)
METHODS = ("teefusion", "gonly", "gonly-scaled")


class LoRALinear(nn.Linear):
    """A Linear layer plus `parts` low-rank adapters on consecutive row blocks of its output (3 for
    the fused qkv, else 1). weight and bias are the base layer's own tensors (shared, frozen), under
    their own names, so the base keys of a state dict do not change; lora_A (parts r, in) and lora_B
    (out, r) are new, float32."""

    def __init__(self, base, rank, alpha, parts=1):
        nn.Module.__init__(self)
        if base.out_features % parts:
            raise ValueError(f"{base.out_features} output rows do not split into {parts} parts")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.parts = rank, float(alpha), parts
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(parts * rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's draw for its weight

    @property
    def scale(self):
        return self.alpha / self.rank

    def delta(self):
        """(alpha / r) B A, (out, in) in float32: the rows of part p are B_p A_p. Merging adds it to W."""
        A = self.lora_A.float().view(self.parts, self.rank, self.in_features)  # (p, r, in)
        B = self.lora_B.float().view(self.parts, -1, self.rank)  # (p, out / p, r)
        return self.scale * torch.bmm(B, A).flatten(0, 1)  # (out, in)

    def forward(self, x):
        out = F_.linear(x, self.weight, self.bias)  # (..., out)
        # the adapters in float32 (their dtype), or in bf16 under autocast
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        u = F_.linear(h, self.lora_A)  # (..., p r)
        if self.parts == 1:
            d = F_.linear(u, self.lora_B)  # (..., out)
        else:
            u = u.unflatten(-1, (self.parts, self.rank))  # (..., p, r)
            B = self.lora_B.view(self.parts, -1, self.rank)  # (p, out / p, r)
            d = torch.einsum("...pr,por->...po", u, B).flatten(-2)  # (..., out)
        return out + (self.scale * d).to(out.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, parts={self.parts}"


# -----------------------------------------------------------------------------
# Settings, and the student built from them


def settings(rank, alpha=None, targets=None, full=None, flag="--lora"):
    """The checked settings as a plain dict (saved in files and checkpoints). alpha defaults to the
    rank (scale 1), targets to DEFAULT_TARGETS, full to DEFAULT_FULL (names as a list or a
    comma-separated string). Refuses a rank < 1, alpha <= 0, an unknown name, a module named twice.
    flag: the command's name for the rank (in messages)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{flag} {rank}: the rank must be an integer >= 1")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"--lora-alpha {alpha:g}: alpha must be > 0 (the adapters' scale is alpha / rank)")
    targets = _names(DEFAULT_TARGETS if targets is None else targets, TARGETS, "--lora-targets")
    full = _names(DEFAULT_FULL if full is None else full, FULL, "--lora-full")
    both = [t for t in targets if t in full]
    if both:
        raise ValueError(f"--lora-targets {both[0]} is also in --lora-full: a module is adapted or trained fully, "
                         "not both")
    return dict(rank=rank, alpha=alpha, targets=targets, full=full)


def check_rank(spec, config, flag="--lora"):
    """The rank against the layers it adapts (an MMDiTConfig): r <= min(inputs, outputs) of every adapted
    layer (per part for the fused qkv). B A of a larger rank is no more expressive (its rank is at most
    that), only larger: past it the "low-rank" adapter has more parameters than the layer itself."""
    targets = [re.compile(TARGETS[t]) for t in spec["targets"]]
    with torch.device("meta"):
        model = MMDiT(config)
    sizes = [(min(m.in_features, m.out_features // (3 if n.endswith("qkv") else 1)), n)
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p.fullmatch(n) for p in targets)]
    if sizes and spec["rank"] > min(sizes)[0]:
        bound, name = min(sizes)
        raise ValueError(f"{flag} {spec['rank']}: beyond the rank of the layers it adapts (at most {bound}: {name} has "
                         f"{bound} as its smaller side); a larger B A is no more expressive, only larger than "
                         "the layer")
    return spec


def _names(names, known, flag):
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    bad = [n for n in names if n not in known and n != "none"]
    if bad:
        raise ValueError(f"{flag}: unknown name {bad[0]!r}; choose from {', '.join(known)} (comma-separated), or none")
    if "none" in names and len(names) > 1:
        raise ValueError(f"{flag}: 'none' cannot be combined with other names")
    return [n for n in known if n in names]  # a fixed order


def attach(base, spec):
    """The LoRA student over `base` (an MMDiT): a new module tree whose frozen weights ARE base's
    tensors (nothing copied; they are frozen), with LoRALinear layers on spec["targets"] and float32
    trainable copies of the spec["full"] modules. spec: `settings(...)`. The result's
    .lora_settings is spec."""
    shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, shared).requires_grad_(False)  # new modules, the same tensors
    full = [re.compile(FULL[f]) for f in spec["full"]]
    targets = [re.compile(TARGETS[t]) for t in spec["targets"]]
    for name, module in list(model.named_modules()):
        if any(p.fullmatch(name) for p in full):
            for pname, p in list(module.named_parameters()):
                owner, leaf = _parent(module, pname)
                setattr(owner, leaf, nn.Parameter(p.detach().float().clone()))  # trained fully, float32
        elif isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in targets):
            owner, leaf = _parent(model, name)
            setattr(owner, leaf, LoRALinear(module, spec["rank"], spec["alpha"], 3 if name.endswith("qkv") else 1))
    model.lora_settings = dict(spec)
    model.lora_trained = [n for n, p in model.named_parameters() if p.requires_grad]  # also for its EMA copy
    return model


def _parent(root, name):
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def is_lora(model):
    return hasattr(model, "lora_settings")


def adapters(model):
    """[(module name, LoRALinear)] of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_state(model):
    """The student's trained tensors under their parameter names (checkpoints: resumed bit for bit)."""
    own = dict(model.named_parameters())
    return {n: own[n].detach().cpu().contiguous() for n in model.lora_trained}


def load_trainable(model, tensors, path):
    """Put the tensors of `trainable_state` back; refuses a file that holds other names or shapes."""
    own = {n: p for n, p in model.named_parameters() if n in model.lora_trained}
    if tensors.keys() != own.keys():
        extra, missing = sorted(tensors.keys() - own.keys()), sorted(own.keys() - tensors.keys())
        raise CheckpointError(f"{path} holds other adapters than this run trains (missing "
                              f"{checkpoint.listing(missing, 3) or 'none'}; unexpected {checkpoint.listing(extra, 3) or 'none'}): "
                              "were --lora, --lora-targets or --lora-full changed?")
    with torch.no_grad():
        for n, p in own.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: {n} is {tuple(tensors[n].shape)}, this run's is {tuple(p.shape)}")
            p.copy_(tensors[n])


def merge(model, dtype=torch.float32):
    """A plain MMDiT equal to the LoRA student: W + (alpha / r) B A for every adapted layer, computed in
    float32, stored in `dtype`; the base network is not touched (its tensors are shared)."""
    deltas = {f"{n}.weight": m.delta() for n, m in adapters(model)}
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        v = v.detach().float() + deltas[k] if k in deltas else v.detach()
        state[k] = v.to(dtype) if v.is_floating_point() else v
    with torch.device("meta"):
        plain = MMDiT(model.config)
    plain.load_state_dict(state, assign=True)
    return plain.eval()


def count(config, spec):
    """(trainable parameters, parameters of the base network, numbers in its lora.safetensors) of a LoRA
    student, counted on the meta device. The file holds each adapter's pairs, and for each module trained
    fully a full-rank pair (min(out, in) (out + in)) and its bias; with any of those, every pair's lora_B
    has a bias (`diffusers_lora_state`)."""
    with torch.device("meta"):
        base = MMDiT(config)
        student = attach(base, spec)
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    layers = adapters(student)
    full = [m for n, m in student.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in student.lora_trained]
    stored = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers)
    stored += sum(min(m.in_features, m.out_features) * (m.in_features + m.out_features) + m.out_features for m in full)
    stored += sum(m.out_features for _, m in layers) if full else 0
    return trained, sum(p.numel() for p in base.parameters()), stored


# -----------------------------------------------------------------------------
# diffusers' SD3 LoRA format


def full_rank_pair(delta_w, delta_b):
    """An exact LoRA pair for a weight change delta_w (out, in) and bias change delta_b (out,):
    rank min(out, in), the smaller side an identity: (A, B, bias) with B A = delta_w."""
    out, inp = delta_w.shape
    if inp <= out:
        return torch.eye(inp), delta_w, delta_b  # A (in, in), B (out, in)
    return delta_w, torch.eye(out), delta_b  # A (out, in), B (out, out)


def diffusers_lora_state(model, base):
    """The adapter in diffusers' SD3 LoRA names: {transformer.<module>.lora_A.weight / .lora_B.weight
    (/ .lora_B.bias)} as float32. Each adapted layer gives one pair per part (qkv: to_q, to_k, to_v),
    its scale folded into lora_B; a layer diffusers stores as (scale, shift) has the halves of lora_B
    swapped as its weight's are (checkpoint.diffusers_source). The modules trained fully give an exact
    full-rank pair of their change from `base` (the network the student was attached to)."""
    depth, out = model.config.depth, {}

    def put(stability_module, pieces):
        keys, swap = checkpoint.diffusers_source(stability_module + ".weight", depth)
        for key, (A, B, bias) in zip(keys, pieces(len(keys))):
            name = PREFIX + key[:-len(".weight")]
            out[f"{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = (checkpoint.swap_halves(B) if swap else B).detach().float().cpu().contiguous()
            if bias is not None:
                out[f"{name}.lora_B.bias"] = (checkpoint.swap_halves(bias) if swap else bias).detach().float().cpu()

    for name, m in adapters(model):
        A, B = m.lora_A.float().chunk(m.parts), (m.scale * m.lora_B.float()).chunk(m.parts)
        put(name, lambda n, A=A, B=B: [(a, b, None) for a, b in zip(A, B)])
    base_modules = dict(base.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and f"{name}.weight" in model.lora_trained:
            ref = base_modules[name]
            dw, db = m.weight.float() - ref.weight.float(), m.bias.float() - ref.bias.float()
            put(name, lambda n, dw=dw, db=db: [full_rank_pair(dw, db)])
    if any(k.endswith(".bias") for k in out):  # a loader then gives every lora_B a bias: say each one
        for k in [k for k in out if k.endswith(".lora_B.weight")]:
            out.setdefault(k[:-len("weight")] + "bias", torch.zeros(out[k].shape[0]))
    return out


def _diffusers_index(config):
    """diffusers module name -> (MMDiT module name, part, parts, swap, (out, in)) for every Linear layer."""
    with torch.device("meta"):
        model = MMDiT(config)
    index = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            keys, swap = checkpoint.diffusers_source(name + ".weight", config.depth)
            for i, key in enumerate(keys):
                index[key[:-len(".weight")]] = (name, i, len(keys), swap, (m.out_features, m.in_features))
    return index


def _open_adapter(path, stack):
    """(open file, its keys, its metadata, the transformer's key prefix) of a LoRA file in diffusers' SD3
    format: the pipeline's (keys under transformer.), or the transformer's own (save_lora_adapter: no
    prefix). Refuses other formats with a message that says what the file is."""
    f = checkpoint.open_safetensors(path, stack)
    keys, meta = list(f.keys()), f.metadata() or {}
    if not keys or not all(".lora_A." in k or ".lora_B." in k for k in keys):
        kind = ("a kohya-style LoRA (lora_down / lora_up)" if any(".lora_down." in k for k in keys) else
                "not a LoRA adapter (no lora_A / lora_B keys)")
        raise CheckpointError(f"{path}: {kind}; expected diffusers' SD3 format, {PREFIX}<module>.lora_A.weight / "
                              f".lora_B.weight (first keys: {checkpoint.listing(keys, 3)})")
    checkpoint.check_floats(f, keys, path, "LoRA weights")
    prefix = PREFIX if any(k.startswith(PREFIX) for k in keys) else ""
    others = [k for k in keys if not k.startswith(prefix)]
    if others:
        raise CheckpointError(f"{path}: tensors for other networks than the transformer ({checkpoint.listing(others, 3)}): "
                              "only the MMDiT's adapters are read")
    if "lora_adapter_metadata" in meta:  # diffusers' own writer records the alphas: read only alpha = rank
        with cli.reading(path, f"{path} (its lora_adapter_metadata)"):
            cfg = json.loads(meta["lora_adapter_metadata"])
        if (cfg.get("alpha_pattern") or {}) != (cfg.get("rank_pattern") or {}) or \
                float(cfg.get("lora_alpha", cfg.get("r"))) != float(cfg.get("r")):
            raise CheckpointError(f"{path}: its lora_adapter_metadata scales the adapters by lora_alpha / r "
                                  f"({cfg.get('lora_alpha')} / {cfg.get('r')}); only files with the scale folded into "
                                  "lora_B (no alphas) are read")
    return f, keys, meta, prefix


def _plan(f, keys, prefix, config, path):
    """From the file's headers: {MMDiT module: (parts, swap, {part: diffusers module})}, every pair
    checked against the layer it adapts."""
    index, plan = _diffusers_index(config), {}
    shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in keys}
    for key in shapes:
        module = key.rpartition(".lora_")[0]
        if module not in index:
            raise CheckpointError(f"{path}: {prefix}{module} is no Linear layer of this MMDiT (depth {config.depth}, "
                                  f"dual attention {list(config.dual_attention_layers)})")
        name, part, parts, swap, (out, inp) = index[module]
        A, B = (shapes.get(f"{module}.lora_{s}.weight") for s in "AB")
        if A is None or B is None:
            raise CheckpointError(f"{path}: {prefix}{module} lacks its lora_A or lora_B weight")
        if len(A) != 2 or len(B) != 2 or A[1] != inp or B[0] != out // parts or A[0] != B[1]:
            raise CheckpointError(f"{path}: {prefix}{module}: lora_A {A} and lora_B {B} do not fit a layer of {inp} "
                                  f"inputs and {out // parts} outputs")
        plan.setdefault(name, (parts, swap, {}))[2][part] = module
    return plan


def is_adapter_file(path):
    """Does a file hold LoRA pairs (lora_A / lora_B keys)? From its header."""
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        return False
    with ExitStack() as stack:
        return any(".lora_A." in k for k in checkpoint.open_safetensors(path, stack).keys())


BASE_PROBE = "teefusion_lora_base_probe"  # an adapter's record of the base it was trained over (base_probe)
PROBE_TENSORS = ("x_embedder.proj.bias", "t_embedder.mlp.0.bias", "final_layer.linear.bias")
PROBE_VALUES = 8


def base_probe(tensor):
    """The first PROBE_VALUES numbers of each PROBE_TENSORS tensor of a base (tensor: Stability name ->
    tensor): small, the same in every layout and precision up to rounding, and different between
    checkpoints. save_adapter records it; check_adapter compares a --base against it."""
    return [[float(v) for v in tensor(name).flatten()[:PROBE_VALUES].float()] for name in PROBE_TENSORS]


def file_probe(path):
    """base_probe of a checkpoint file or folder, reading only those three tensors."""
    with ExitStack() as stack:
        where, sources, _, _ = checkpoint.read_layout(path, stack)
        return base_probe(lambda name: checkpoint.read_tensor(where, sources, name, path))


def check_adapter(path, config, base_path=None, flag="--base"):
    """Check a LoRA file against an MMDiT config from its headers alone; with base_path, also that the
    adapter was trained over that checkpoint (its recorded base_probe, within bf16's rounding: a base in
    another layout or precision passes, another network does not). Returns its metadata."""
    with ExitStack() as stack:
        f, keys, meta, prefix = _open_adapter(path, stack)
        _plan(f, keys, prefix, config, path)
    if base_path is not None and BASE_PROBE in meta:
        with cli.reading(path, f"{path} (its {BASE_PROBE} metadata)"):
            trained = torch.tensor(json.loads(meta[BASE_PROBE]), dtype=torch.float64)
        given = torch.tensor(file_probe(base_path), dtype=torch.float64)
        if torch.isfinite(given).all() and (  # (a non-finite base is refused by name as it loads)
                trained.shape != given.shape or not torch.allclose(given, trained, rtol=1e-2, atol=1e-5)):
            raise CheckpointError(f"{path} was trained over another base than {flag} {base_path} (their "
                                  f"{PROBE_TENSORS[0]} differ): give the network the adapter was trained from")
    return meta


def load_adapter(base, path):
    """The student of a diffusers-format SD3 LoRA file over `base`: a LoRA model (attach) whose
    adapters hold the file's pairs, each module with the rank its pairs have (parts of lower rank
    padded with zeros, a missing part zero: exact); a pair with a non-zero lora_B.bias (a module trained
    fully) is added to a float32 copy of the base's weight and bias. Returns (model, the metadata)."""
    model = attach(base, settings(1, targets=(), full=()))
    with ExitStack() as stack:
        f, keys, meta, prefix = _open_adapter(path, stack)
        for name, (parts, swap, by_part) in _plan(f, keys, prefix, base.config, path).items():
            layer = model.get_submodule(name)
            pieces = {}
            for part, module in by_part.items():
                A, B, bias = (f.get_tensor(f"{prefix}{module}.lora_{k}").float() if f"{prefix}{module}.lora_{k}" in keys
                              else None for k in ("A.weight", "B.weight", "B.bias"))
                if not all(checkpoint.all_finite(t) for t in (A, B, bias) if t is not None):
                    raise CheckpointError(f"{path}: {prefix}{module} holds non-finite values (NaN or inf): a diverged "
                                          "or corrupt adapter")
                if swap:
                    B, bias = checkpoint.swap_halves(B), bias if bias is None else checkpoint.swap_halves(bias)
                pieces[part] = (A.to(layer.weight.device), B.to(layer.weight.device), bias)
            owner, leaf = _parent(model, name)
            if any(bias is not None and bias.any() for _, _, bias in pieces.values()):  # trained fully: its change
                A, B, bias = pieces[0]
                plain = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device)
                plain.weight = nn.Parameter(layer.weight.detach().float() + B @ A)
                plain.bias = nn.Parameter(layer.bias.detach().float() + bias.to(layer.weight.device))
                setattr(owner, leaf, plain.requires_grad_(False))
                continue
            rank, o = max(A.shape[0] for A, _, _ in pieces.values()), layer.out_features // parts
            new = LoRALinear(layer, rank, rank, parts).requires_grad_(False)  # the scale is folded in: 1
            with torch.no_grad():
                new.lora_A.zero_()
                for p, (A, B, _) in pieces.items():
                    new.lora_A[p * rank:p * rank + len(A)] = A
                    new.lora_B[p * o:(p + 1) * o, :len(A)] = B
            setattr(owner, leaf, new)
    stored = meta.get(METADATA)
    with cli.reading(path, f"{path} (its {METADATA} metadata)"):
        model.lora_settings = json.loads(stored) if stored else dict(rank=None, alpha=None, targets=[], full=[])
    model.lora_trained = []  # a student to sample from: nothing of it trains
    return model, meta


def load_student(base_path, path, device="cpu", dtype=torch.float32):
    """A LoRA student as a plain MMDiT: the base checkpoint read in float32 on the CPU, the adapter
    merged in float32, then cast to `dtype` and moved to `device` (the adapters' changes are mostly
    below bf16's resolution of the weights: merging in bf16 would lose them). Frozen, eval mode."""
    base = load_mmdit(base_path, dtype=torch.float32)
    student, _ = load_adapter(base, path)
    return merge(student, dtype).to(device).requires_grad_(False)


def save_adapter(model, base, path, metadata=None, dtype=torch.float32):
    """lora.safetensors: `diffusers_lora_state` in `dtype` (float32: exactly what was trained; bf16: half
    the size, each number rounded to bf16) with metadata (the settings under teefusion_lora and the
    caller's str -> str pairs), atomically."""
    state = base.state_dict()
    meta = {"format": "pt", METADATA: json.dumps(model.lora_settings), BASE_PROBE: json.dumps(base_probe(state.get)),
            **(metadata or {})}
    tensors = {k: v.to(dtype) for k, v in diffusers_lora_state(model, base).items()}
    checkpoint._atomic_save(tensors, path, meta)
    return path


# -----------------------------------------------------------------------------
# Commands: merge, count


def merge_files(base_path, lora_path, out_path, dtype=torch.float32, of=None):
    """A full student in Stability's layout from a base checkpoint and an adapter file, with the
    adapter's metadata (the method, teacher and step that student_file.load_student and generate.py read);
    of: `merge_inputs`, recorded under teefusion_merge_of (a relaunch finds the merge done). Only a student
    whose every weight is finite in `dtype` is written."""
    base = load_mmdit(base_path, dtype=torch.float32)
    student, meta = load_adapter(base, lora_path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "mmdit_config", "lora_adapter_metadata")}
    meta["teefusion_lora_base"] = os.path.basename(os.path.normpath(base_path))
    if of is not None:
        meta[MERGE_OF] = json.dumps(of)
    merged = merge(student, dtype)
    bad = [k for k, v in merged.state_dict().items() if not checkpoint.all_finite(v)]
    if bad:
        raise cli.Failure(f"the merged student has non-finite weights ({checkpoint.listing(bad, 3)}) in {dtype}: "
                          f"nothing was written to {out_path}" + ("; try --dtype fp32 or bf16 (fp16 overflows)"
                                                                   if dtype == torch.float16 else ""))
    return save_mmdit(merged, out_path, metadata=meta)


MERGE_OF = "teefusion_merge_of"  # the merged file's record of its inputs (merge_inputs)


def merge_inputs(base_path, lora_path, dtype):
    """What a merged file is a function of: the SHA-256 of the base's file(s) and of the adapter, and the
    dtype (reading them costs about a second per GB)."""
    files, _ = checkpoint.resolve_files(base_path)
    return {"base": [relaunch.digest(f)["sha256"] for f in files], "lora": relaunch.digest(lora_path)["sha256"],
            "dtype": dtype}


def merged_from(path):
    """The merge_inputs recorded in a file written by `merge_files`, or None (another file, or none)."""
    try:
        with ExitStack() as stack:
            stored = (checkpoint.open_safetensors(path, stack).metadata() or {}).get(MERGE_OF)
        return json.loads(stored) if stored else None
    except (OSError, ValueError):
        return None



def run_path(args, merged):
    """What distill.main returns for a LoRA run (args: distill.py's): the merged student in the toy
    world (its report reads it), else the adapter; the EMA's with --ema."""
    ema = "-ema" if args.ema is not None else ""
    return os.path.join(args.out, f"student{ema}.safetensors" if merged else f"lora{ema}.safetensors")


def save_run(args, student, ema, base, merged, meta, part=None):
    """distill.py's final files of a LoRA run (args: its arguments; meta: the student metadata):
    lora.safetensors (diffusers' SD3 LoRA format; lora-ema.safetensors with --ema) and, in the toy
    world (merged=True), the merged students student.safetensors /
    student-ema.safetensors (Stability layout) that the toy report reads; for SD3 the merge is
    `python -m sd3.lora merge` (it streams the base from disk). part(name, write): how each file is
    written (run/final_files.py passes relaunch.Record.write, which skips a file already there; write()
    returns the paths it wrote); default: write it. Returns run_path."""
    part = part or (lambda name, write: write())
    for suffix, s in (("", student), ("-ema", ema)):
        if s is None:
            continue
        path = os.path.join(args.out, f"lora{suffix}.safetensors")

        def adapter(s=s, path=path):
            save_adapter(s.model, base, path, meta, DTYPES[args.lora_dtype])
            print(f"adapter: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
            return [path]

        part(f"lora{suffix}", adapter)
        if merged:
            part(f"student{suffix}", lambda s=s, suffix=suffix: [save_mmdit(
                merge(s.model), os.path.join(args.out, f"student{suffix}.safetensors"), metadata=meta)])
        elif args.teacher is not None:
            print(f"full student: python -m sd3.lora merge --base {base_file(args)} --lora {path} "
                  f"--out {os.path.join(args.out, f'student{suffix}.safetensors')}")
    return run_path(args, merged)


def base_file(args):
    """distill.py's arguments -> the checkpoint a LoRA student's adapters are over (the network it
    started from)."""
    if args.teacher_sampler == "w2sd":
        return args.teacher if args.w2sd_final == "main" else (args.strong or args.teacher)
    return args.teacher


def main(args):
    if args.command == "merge":
        for flag, path in (("--base", args.base), ("--lora", args.lora)):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{flag} {path}: no such file or folder")
        # the files the merge reads, by any name: --out is none of them (the merge never replaces its input)
        files, _ = checkpoint.resolve_files(args.base)
        folder = os.path.dirname(files[0])
        inputs = [("--base", f) for f in files] + [("--lora", args.lora)] + \
                 [("--base", os.path.join(folder, n)) for n in ("config.json", INDEX_JSON)]
        check_adapter(args.lora, read_config(args.base), args.base)  # from headers, before the base loads
        cli.output_file(args.out, "--out", suffixes=(".safetensors",), inputs=inputs)
        # the relaunch rule: a merge already there, of the same inputs, is kept; what a killed one left is removed
        of = merge_inputs(args.base, args.lora, args.dtype)
        if os.path.isfile(args.out) and merged_from(args.out) == of:
            print(f"{args.out} is already the merge of --base {args.base} and --lora {args.lora} ({args.dtype}): "
                  "nothing was written")
            return args.out
        name = os.path.basename(args.out)
        checkpoint.remove_temporaries(os.path.dirname(os.path.abspath(args.out)), owned=lambda n: n == name)
        path = merge_files(args.base, args.lora, args.out, DTYPES[args.dtype], of)
        print(f"merged student: {path} (Stability layout, {args.dtype})")
        return path
    spec = check_rank(settings(args.rank, args.lora_alpha, args.lora_targets, args.lora_full, flag="--rank"),
                      CONFIGS[args.config], "--rank")
    trained, total, stored = count(CONFIGS[args.config], spec)
    print(f"{args.config}, rank {spec['rank']}, targets {','.join(spec['targets']) or 'none'}, trained fully "
          f"{','.join(spec['full']) or 'none'}: {trained / 1e6:.2f} M trainable parameters of {total / 1e9:.3f} B "
          f"({100 * trained / total:.2f}%); lora.safetensors holds {stored / 1e6:.2f} M numbers: "
          f"{4 * stored / 1e6:.0f} MB in float32, {2 * stored / 1e6:.0f} MB with --lora-dtype bf16")
    return trained, total, stored


def add_arguments(parser):
    """--lora-alpha, --lora-targets, --lora-full (distill.py and `python -m sd3.lora count`)."""
    parser.add_argument("--lora-alpha", type=float, default=None, help="the adapters' scale is alpha / rank "
                        "(default alpha = rank: scale 1)")
    parser.add_argument("--lora-targets", default=None,
                        help=f"the layers that get adapters, comma-separated from {', '.join(TARGETS)}, or none "
                             f"(default {','.join(DEFAULT_TARGETS)}: attention, MLP and adaLN of both streams)")
    parser.add_argument("--lora-dtype", default=None, choices=("fp32", "bf16"),
                        help="of lora.safetensors: fp32 (default, exactly what was trained) or bf16 (half the size)")
    parser.add_argument("--lora-full", default=None,
                        help=f"modules trained fully, from {', '.join(FULL)} (G and F, which carry Eq. 7's fused "
                             f"term), or none (default {','.join(DEFAULT_FULL)})")


if __name__ == "__main__":
    from run import cli

    parser = cli.parser("LoRA students: merge an adapter into its base, or count a LoRA student's parameters.", prog="python -m sd3.lora")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="base + adapter -> a full student (Stability layout, student metadata)")
    m.add_argument("--base", required=True, help="the network the adapter was trained over (any load_mmdit input)")
    m.add_argument("--lora", required=True, help="the adapter (lora.safetensors, diffusers' SD3 LoRA format)")
    m.add_argument("--out", required=True, help="the student file to write (.safetensors)")
    m.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="of the written weights (default fp32: "
                   "the adapters' changes are below bf16's resolution of the weights)")
    c = sub.add_parser("count", help="trainable parameters of a LoRA student, counted on the meta device")
    c.add_argument("--config", default="sd3-medium", choices=sorted(CONFIGS))
    c.add_argument("--rank", type=int, default=16)
    add_arguments(c)
    cli.run(main, parser)
