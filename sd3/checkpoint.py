"""
Checkpoint files: how the SD3 MMDiT's tensors are stored, read and written, and how every file
of this project is written without ever leaving half of one.

The network itself is mmdit.py; this file knows only names, shapes and bytes (docs/DESIGN.md,
"The SD3 / SD3.5 MMDiT" and "Files"), in two layouts:

    Stability   one file, keys under `model.diffusion_model.` (or without it), the parameter
                names of mmdit.py; the same file may hold the VAE and text encoders, never read
    diffusers   a `transformer/` folder: config.json + diffusion_pytorch_model.safetensors, or
                shards named by diffusion_pytorch_model.safetensors.index.json; other names
                (`DIFFUSERS_BLOCK_KEYS`), qkv split into to_q / to_k / to_v, and (scale, shift)
                where Stability has (shift, scale) in two tensors (`diffusers_source`)

Only safetensors are opened: a pickle (.ckpt/.pt/.pth/.bin, or a torch.save file under any name)
can execute code when loaded and is refused with a message that says so. Tensors are read one at
a time (safe_open), so loading costs the model's own memory.

Writes are atomic (`atomic_write`): a temporary file beside the target, fsynced, then renamed
over it; a crash leaves the old file or the new one. distill.py, prepare.py, evaluate.py, evaluation/fid.py
and toy.py write through it too. A kill leaves at most NAME.tmp-XXXX behind (`TEMPORARY`), which
each command's relaunch removes from the files it owns (`remove_temporaries`).

Test hook (the relaunch tests; unset in normal use): TEEFUSION_KILL_AT_WRITE="N" or "N:TEXT" makes
the process kill itself with SIGKILL at its N-th atomic write (counting only targets whose path
contains TEXT), after the temporary file is filled and before it is renamed over the target: the
moment a kill does the most harm. Under torchrun the launcher is killed first, so the whole job
dies with SIGKILL, as when a batch system kills it (the other workers die with their launcher:
cli.die_with_launcher).

    python mmdit.py CHECKPOINT      # the config inferred from a checkpoint's tensors (uses this file)
    python -m pytest tests/test_mmdit.py   # both layouts, shards, export, round trip, bad files
"""

import filecmp
import hashlib
import json
import os
import re
import signal
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from run import cli

STABILITY_PREFIX = "model.diffusion_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong."""


# -----------------------------------------------------------------------------
# Atomic writes (every file the project writes)

KILL_AT_WRITE = "TEEFUSION_KILL_AT_WRITE"  # the test hook of the module docstring
TEMPORARY = re.compile(r"\.tmp-[^.]*(\.\w+)?$")  # atomic_write's temporary names: NAME.tmp-XXXX[.suffix]
_writes = [0]  # atomic writes counted by the test hook in this process


def _test_kill(path):
    """The test hook: SIGKILL at the chosen write (module docstring); nothing when the variable is unset."""
    spec = os.environ.get(KILL_AT_WRITE)
    if not spec:
        return
    n, _, text = spec.partition(":")
    if text not in path:
        return
    _writes[0] += 1
    if _writes[0] == int(n):
        if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: the launcher first, so the whole job dies
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def temporaries(folder, recursive=False, owned=None):
    """The temporary files that killed writes left in folder (and below it, if recursive), sorted; owned:
    a predicate on the target's name (NAME of NAME.tmp-XXXX) choosing the ones a command owns."""
    found = []
    for root, dirs, files in os.walk(folder) if os.path.isdir(folder) else ():
        for name in files:
            m = TEMPORARY.search(name)
            if m and (owned is None or owned(name[:m.start()])):
                found.append(os.path.join(root, name))
        if not recursive:
            break
    return sorted(found)


def remove_temporaries(folder, recursive=False, owned=None, quiet=False):
    """Delete the temporaries of `temporaries(folder, recursive, owned)` and say so in one line. Only for
    a process that owns those files (holds the folder's lock, or is their only writer): a temporary of a
    live writer would be pulled from under it. Returns their paths."""
    removed = temporaries(folder, recursive, owned)
    for path in removed:
        os.remove(path)
    if removed and not quiet:
        print(f"removed {len(removed)} temporary file(s) left by a killed run: {', '.join(removed[:10])}"
              + (", ..." if len(removed) > 10 else ""), flush=True)
    return removed


def atomic_write(path, write, suffix="", keep_same=False):
    """Write a file so that a crash at any moment leaves the old file or the new one, never
    half of one: write(tmp) fills a temporary file beside `path` (named path.tmp-XXXX, so
    leftovers of a killed run are easy to find), which is fsynced and renamed over `path`.
    suffix: the temporary name's ending, for writers that insist on one (np.savez: ".npz", PIL
    guessing the format from the name: ".png"). keep_same: when `path` already holds the same
    bytes, leave it untouched (reports and figures a relaunch computes again).
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        if keep_same and os.path.isfile(path) and filecmp.cmp(tmp, path, shallow=False):
            os.remove(tmp)
            return
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _test_kill(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_json(obj, path, indent=1):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)

    atomic_write(path, write)


def _atomic_save(tensors, path, metadata):
    """A dict of tensors as one safetensors file, atomically."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def all_finite(t):
    """Is every number of a tensor finite (no NaN, no inf)? One pass and no copy: aminmax propagates a
    NaN, and an inf is the min or the max (30x faster than isfinite(t).all() on a CPU)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


# -----------------------------------------------------------------------------
# Stability <-> diffusers names


# diffusers name (relative to transformer_blocks.N) for each Stability name (relative to
# joint_blocks.N); a tuple of three is a qkv split into to_q, to_k, to_v.
DIFFUSERS_BLOCK_KEYS = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
DIFFUSERS_TOP_KEYS = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}


def diffusers_source(key, depth):
    """Stability key -> (diffusers keys to concatenate on dim 0, swap halves?).

    diffusers stores (scale, shift) where Stability stores (shift, scale) in two places:
    the final layer's adaLN and the last block's pre-only text-stream adaLN."""
    if key == "pos_embed":
        return ["pos_embed.pos_embed"], False
    module, param = key.rsplit(".", 1)
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", module)
    if m:
        i, rel = int(m.group(1)), m.group(2)
        names = DIFFUSERS_BLOCK_KEYS[rel]
        names = names if isinstance(names, tuple) else (names,)
        swap = rel == "context_block.adaLN_modulation.1" and i == depth - 1
        return [f"transformer_blocks.{i}.{n}.{param}" for n in names], swap
    return [f"{DIFFUSERS_TOP_KEYS[module]}.{param}"], module == "final_layer.adaLN_modulation.1"


def swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _diffusers_sources(where, shape):
    """Shapes and sources, under Stability names, of a diffusers state dict."""
    depth = 1 + max(int(k.split(".")[1]) for k in where if k.startswith("transformer_blocks."))
    sources, shapes, used = {}, {}, set()
    stab_keys = [f"{k}.{p}" for k in DIFFUSERS_TOP_KEYS if k != "pos_embed" for p in ("weight", "bias")]
    stab_keys.append("pos_embed")
    for i in range(depth):
        for rel in DIFFUSERS_BLOCK_KEYS:
            for p in ("weight",) if ".ln_" in rel else ("weight", "bias"):
                stab_keys.append(f"joint_blocks.{i}.{rel}.{p}")
    for k in stab_keys:
        keys, swap = diffusers_source(k, depth)
        if all(s in where for s in keys):  # absent pieces (qk norm, attn2, ...) are left to the checks
            sources[k] = (keys, swap)
            first = shape(keys[0])
            shapes[k] = (sum(shape(s)[0] for s in keys),) + first[1:]
            used.update(keys)
    for k in where:  # diffusers tensors with no Stability counterpart
        if k not in used:
            sources[f"<diffusers> {k}"] = ([k], False)
    return sources, shapes


# -----------------------------------------------------------------------------
# Reading: safetensors only, one tensor at a time


def open_safetensors(path, stack):
    """safe_open(path) entered into the ExitStack `stack`; pickles and other formats refused."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: refusing a pickle checkpoint (.ckpt/.pt/.pth/.bin): loading it could "
                              "execute code. Convert it to safetensors first; only .safetensors files are read.")
    try:
        return stack.enter_context(safe_open(path, framework="pt", device="cpu"))
    except SafetensorError as e:
        # only now look at the bytes, to say what the file is (a valid safetensors file may
        # itself start with 0x80: its first 8 bytes are the header length)
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; "
                                  "only safetensors files are read, because pickles can execute code") from e
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated, or another format): {e}") from e


FINGERPRINT_CHUNK = 1 << 20


def fingerprint(path):
    """A short identity of a weights file, or of every .safetensors file under a folder: sha256 of each
    file's name, size and three 1 MiB samples of its bytes (the start, with the safetensors header:
    keys, shapes, metadata; the middle; the end). Two trainings of one network differ in every sample;
    reading 3 MiB per file keeps this fast at any size. None for None."""
    if path is None:
        return None
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(here, n) for here, _, names in os.walk(path, followlinks=True)
                       for n in names if n.endswith(".safetensors"))
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, path) if f != path else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
                fh.seek(offset)
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()[:16]


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E4M3", "F8_E5M2")  # safetensors' names of floating-point types


def check_floats(f, keys, path, what="weights"):
    """Every tensor of `keys` in the open safetensors file `f` is floating point, from the header alone:
    an integer (quantized) or boolean file is refused by name (loaded, it would be cast silently)."""
    for k in keys:
        dtype = f.get_slice(k).get_dtype()
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {k} is {dtype}, not floating point: {what} are read as float32, "
                                  "bfloat16 or float16 (a quantized file? convert it to floating point first)")


def resolve_files(path):
    """A file, a diffusers transformer folder, or a pipeline folder with transformer/ ->
    (list of safetensors files, config dict or None)."""
    if os.path.isfile(path):
        return [path], None
    cli.regular_file(path, f"checkpoint {path}")  # a device (/dev/null) or a FIFO: named as what it is
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(os.path.join(path, "transformer")) and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.join(path, "transformer")
    config = None
    if os.path.exists(os.path.join(path, "config.json")):
        config = cli.read_json(os.path.join(path, "config.json"))
        if not isinstance(config, dict):
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: not a diffusers config (a JSON object)")
    index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.exists(index):
        weight_map = cli.read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no \"weight_map\" of tensor names to shard files, as diffusers "
                                  "writes it")
        shards = sorted(set(weight_map.values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {missing}")
        return files, config
    if os.path.exists(single):
        return [single], config
    found = sorted(os.listdir(path))
    raise CheckpointError(f"{path}: no diffusion_pytorch_model.safetensors (or its .index.json) in this folder; "
                          f"found {found[:10]}")


def listing(keys, n=20):
    """At most n sorted names, for an error message."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_layout(path, stack):
    """Open the file(s) of a checkpoint and work out, without reading any tensor, for each
    Stability name the tensors to read and how. Returns (where: tensor name -> open file,
    sources: Stability name -> (names to concatenate, swap halves?), shapes: Stability name ->
    shape, num_heads from the metadata or config.json, or None)."""
    files, dconfig = resolve_files(path)
    handles = [open_safetensors(f, stack) for f in files]
    where = {k: h for h in handles for k in h.keys()}  # tensor name -> open file
    meta = handles[0].metadata() or {}
    num_heads = None
    if "mmdit_config" in meta:  # written by mmdit.save_mmdit
        with cli.reading(files[0], f"{files[0]} (its mmdit_config metadata)"):
            num_heads = json.loads(meta["mmdit_config"]).get("num_heads")
    elif dconfig is not None:
        num_heads = dconfig.get("num_attention_heads")

    def shape(k):
        return tuple(where[k].get_slice(k).get_shape())

    if any(k.startswith(STABILITY_PREFIX) for k in where):  # Stability, prefixed: skip VAE / text encoders
        names = {k[len(STABILITY_PREFIX):]: k for k in where if k.startswith(STABILITY_PREFIX)}
        sources = {n: ([k], False) for n, k in names.items()}
        shapes = {n: shape(k) for n, k in names.items()}
    elif any(k.startswith("joint_blocks.") for k in where):  # Stability, no prefix
        sources = {k: ([k], False) for k in where}
        shapes = {k: shape(k) for k in where}
    elif any(k.startswith("transformer_blocks.") for k in where):  # diffusers
        sources, shapes = _diffusers_sources(where, shape)
    else:
        raise CheckpointError(f"{path}: no MMDiT tensors found (neither Stability 'joint_blocks.*' / "
                              f"'{STABILITY_PREFIX}*' nor diffusers 'transformer_blocks.*'); "
                              f"first keys: {listing(where, 8)}")
    for names, _ in sources.values():  # the MMDiT's own tensors (a single file's text encoders hold integer ids)
        for k in names:
            check_floats(where[k], [k], files[0] if len(files) == 1 else path, "MMDiT weights")
    return where, sources, shapes, num_heads


def read_tensor(where, sources, k, path):
    """The tensor of Stability name k, read (and assembled) from the open files."""
    if k not in sources:
        raise CheckpointError(f"{path}: missing key {k}")
    keys, swap = sources[k]
    t = torch.cat([where[s].get_tensor(s) for s in keys], dim=0)
    return swap_halves(t) if swap else t


# -----------------------------------------------------------------------------
# Writing: Stability layout, and the diffusers export


def metadata_with(config, metadata):
    """safetensors metadata: the MMDiT config (its head count cannot always be read off shapes)
    and the caller's str -> str pairs."""
    meta = {"format": "pt", "mmdit_config": json.dumps(config)}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    return meta


def save_stability(state_dict, path, metadata):
    """Tensors under `model.diffusion_model.`, as any loader of Stability's format reads them."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: MMDiT checkpoints are written as .safetensors")
    _atomic_save({STABILITY_PREFIX + k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path, metadata)
    return path


def diffusers_config(cfg):
    """The config.json of diffusers' SD3Transformer2DModel for an MMDiTConfig."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128, "patch_size": cfg.patch_size, "in_channels": cfg.in_channels,
        "num_layers": cfg.depth, "attention_head_dim": cfg.head_size, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.pooled_dim, "out_channels": cfg.out_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size, "dual_attention_layers": list(cfg.dual_attention_layers),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def diffusers_state_dict(model):
    """An MMDiT's tensors under diffusers' names (qkv split, the two halves swapped back)."""
    out = {}
    for k, v in model.state_dict().items():
        keys, swap = diffusers_source(k, model.config.depth)
        v = swap_halves(v) if swap else v
        for name, piece in zip(keys, v.chunk(len(keys), dim=0)):
            out[name] = piece.detach().cpu().contiguous()
    return out


def save_diffusers(model, folder, metadata, extra_config=None):
    """A diffusers transformer folder: config.json + diffusion_pytorch_model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    _atomic_save(diffusers_state_dict(model), os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata)
    atomic_json({**diffusers_config(model.config), **(extra_config or {})}, os.path.join(folder, "config.json"),
                indent=2)
    return folder
