"""
Tests for prepare.py on a handful of generated images: shards readable and right, unreadable
images reported and skipped, resumption rebuilds only missing shards, clear input errors,
ShardDataset under DistributedSampler, and the command line.

    python -m pytest -q tests/test_prepare.py
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from prepare import ShardDataset, find_samples, prepare
from vae import VAE, from_pil, load_image

R = 32  # resolution: latents (16, 4, 4)
GOOD = {  # name -> (size, mode)
    "a0.png": ((40, 32), "RGB"), "a1.jpg": ((32, 48), "RGB"), "c2.png": ((64, 64), "RGBA"),
    "c3.webp": ((33, 35), "RGB"), "e4.jpg": ((50, 40), "L"), "e5.png": ((36, 36), "P"), "f6.png": ((32, 32), "RGB"),
}
BAD = ("b_corrupt.jpg", "d_truncated.png")  # sorted order puts one bad image in each of shards 0 and 1


class FakeTextEncoder:
    """embed.TextEncoders' interface at toy sizes (L=5, Dc=8, Dy=6): a deterministic function of
    each caption alone, so the stored embeddings can be checked exactly."""

    def encode(self, prompts):
        codes = torch.tensor([[float(ord(c) % 32) for c in (p + "     ")[:5]] for p in prompts])  # (B, 5)
        context = codes[:, :, None] / 4 + torch.arange(8) / 8  # (B, L, Dc)
        y = torch.tensor([[len(p) / 4] * 6 for p in prompts])  # (B, Dy)
        return context, y

    def encode_null(self):
        return self.encode([""])


def make_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (name, (size, mode)) in enumerate(GOOD.items()):
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        if mode == "P":
            image = Image.fromarray(pixels[..., :3]).quantize(16)  # a palette image
        else:
            image = Image.fromarray(pixels, "RGBA").convert(mode)
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption {k}: {name} \n")
    (folder / BAD[0]).write_bytes(b"definitely not a jpeg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / BAD[1])
    data = (folder / BAD[1]).read_bytes()
    (folder / BAD[1]).write_bytes(data[: len(data) // 2])
    for name in BAD:
        (folder / name).with_suffix(".txt").write_text(f"unreadable {name}")
    return folder


@pytest.fixture(scope="module")
def vae(tiny_vae_config):
    torch.manual_seed(0)
    return VAE(tiny_vae_config).eval()


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "images")


def run(images, out, vae, **kw):
    root, samples = find_samples(images=str(images))
    kw = dict(dict(shard_size=3, batch_size=2, workers=0, progress=False), **kw)
    return prepare(samples, str(out), vae, R, root=root, **kw)


def test_shards_hold_latents_embeddings_and_captions(images, tmp_path, vae, capsys):
    text = FakeTextEncoder()
    result = run(images, tmp_path / "out", vae, text_encoder=text, dtype=torch.bfloat16, posterior="mean")
    index = result["index"]
    assert result["built"] == [0, 1, 2] and result["reused"] == []
    assert index["num_samples"] == 7 and [s["num_samples"] for s in index["shards"]] == [2, 2, 3]
    assert sorted(s["path"] for s in index["skipped"]) == list(BAD) and index["num_skipped"] == 2
    assert index["latent_shape"] == [16, 4, 4] and index["context_shape"] == [5, 8] and index["y_shape"] == [6]
    assert index["bytes_per_sample"] == 2 * (16 * 4 * 4 + 5 * 8 + 6)
    printed = capsys.readouterr()
    assert all(os.path.join(str(images), name) in printed.out + printed.err for name in BAD)

    ds = ShardDataset(str(tmp_path / "out"))
    assert len(ds) == 7 and ds.has_text
    names = sorted(GOOD)
    errors = []
    for i, name in enumerate(names):
        item = ds[i]
        caption = (images / name).with_suffix(".txt").read_text().strip()
        assert item["caption"] == caption
        expected = vae.encode(from_pil(load_image(images / name, R)))[0]  # (16, 4, 4), posterior mean
        assert item["latents"].shape == (16, 4, 4) and item["latents"].dtype == torch.bfloat16
        errors.append((item["latents"].float() - expected).abs().max().item())
        context, y = text.encode([caption])
        assert torch.equal(item["context"], context[0].bfloat16()) and torch.equal(item["y"], y[0].bfloat16())
    print(f"\nstored bf16 latents vs direct VAE.encode: max error {max(errors):.2e}")
    assert max(errors) < 2e-2  # bf16 rounding of values of order 1
    assert torch.equal(ds[-1]["latents"], ds[6]["latents"])
    with pytest.raises(IndexError):
        ds[7]
    null_context, null_y = ds.null()
    assert torch.equal(null_context, text.encode_null()[0].bfloat16()) and null_y.shape == (1, 6)

    # DistributedSampler splits the map-style dataset; the default collate batches the dicts.
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        for batch in DataLoader(ds, batch_size=2, sampler=sampler):
            assert batch["latents"].shape[1:] == (16, 4, 4) and batch["context"].shape[1:] == (5, 8)
            seen += batch["caption"]
    assert sorted(set(seen)) == sorted(ds[i]["caption"] for i in range(7))  # 8 slots: one sample padded twice


def test_rerun_rebuilds_only_the_deleted_shard(images, tmp_path, vae):
    out = tmp_path / "out"
    first = run(images, out, vae, posterior="sample", seed=3, dtype=torch.float32)
    assert first["built"] == [0, 1, 2]
    shards = sorted(p for p in os.listdir(out) if p.startswith("shard-"))
    mtimes = {p: (out / p).stat().st_mtime_ns for p in shards}
    old = ShardDataset(str(out))
    old_latents = torch.stack([old[i]["latents"] for i in range(len(old))])

    again = run(images, out, vae, posterior="sample", seed=3, dtype=torch.float32)
    assert again["built"] == [] and again["reused"] == [0, 1, 2]

    os.remove(out / "shard-00001.safetensors")
    rebuilt = run(images, out, vae, posterior="sample", seed=3, dtype=torch.float32)
    assert rebuilt["built"] == [1] and rebuilt["reused"] == [0, 2]
    for p in ("shard-00000.safetensors", "shard-00002.safetensors"):
        assert (out / p).stat().st_mtime_ns == mtimes[p]  # untouched
    new = ShardDataset(str(out))
    assert torch.equal(torch.stack([new[i]["latents"] for i in range(len(new))]), old_latents)  # seeded per shard
    assert rebuilt["index"] == first["index"]
    assert not [p for p in os.listdir(out) if ".tmp" in p]

    # Posterior samples differ from the mean (the seed is used), and by seed.
    mean = run(images, tmp_path / "mean", vae, posterior="mean", dtype=torch.float32)
    other = run(images, tmp_path / "seed4", vae, posterior="sample", seed=4, dtype=torch.float32)
    assert mean["index"]["num_samples"] == other["index"]["num_samples"] == 7
    assert not torch.equal(ShardDataset(str(tmp_path / "mean"))[0]["latents"], old_latents[0])
    assert not torch.equal(ShardDataset(str(tmp_path / "seed4"))[0]["latents"], old_latents[0])


def test_processes_split_shards_and_the_last_writes_the_index(images, tmp_path, vae):
    out = tmp_path / "out"
    r0 = run(images, out, vae, rank=0, world_size=2)
    assert r0["built"] == [0, 2] and r0["index"] is None and not (out / "index.json").exists()
    r1 = run(images, out, vae, rank=1, world_size=2)
    assert r1["built"] == [1] and r1["index"]["num_samples"] == 7
    assert not ShardDataset(str(out)).has_text and "context" not in ShardDataset(str(out))[0]


def test_a_shard_with_no_readable_image(images, tmp_path, vae):
    """With one image per shard, the shards of the two unreadable images are empty but well
    formed, and ShardDataset's indexing steps over them."""
    text = FakeTextEncoder()
    index = run(images, tmp_path / "out", vae, shard_size=1, text_encoder=text)["index"]
    assert [s["num_samples"] for s in index["shards"]] == [1, 1, 0, 1, 1, 0, 1, 1, 1]
    with safe_open(str(tmp_path / "out" / "shard-00002.safetensors"), framework="pt") as f:
        assert f.get_tensor("latents").shape == (0, 16, 4, 4) and f.get_tensor("context").shape == (0, 5, 8)
    ds = ShardDataset(str(tmp_path / "out"))
    assert [ds[i]["caption"].split(":")[0] for i in range(len(ds))] == [f"caption {k}" for k in range(7)]


def test_changed_settings_or_inputs_are_errors(images, tmp_path, vae):
    out = tmp_path / "out"
    run(images, out, vae)
    root, samples = find_samples(images=str(images))
    with pytest.raises(ValueError, match="shard-00000.safetensors was written with other settings.*"
                                         "resolution: 32 then, 48 now"):
        prepare(samples, str(out), vae, 48, root=root, shard_size=3, workers=0, progress=False)
    samples[4] = (samples[4][0], "a different caption")
    with pytest.raises(ValueError, match="shard-00001.safetensors holds other images/captions"):
        prepare(samples, str(out), vae, R, root=root, shard_size=3, workers=0, progress=False)
    with pytest.raises(ValueError, match="text"):  # latents-only shards, now asked for text embeddings
        run(images, out, vae, text_encoder=FakeTextEncoder())


def test_caption_files_and_input_errors(images, tmp_path, vae):
    root, from_folder = find_samples(images=str(images))
    assert len(from_folder) == 9 and from_folder[0] == ("a0.png", "caption 0: a0.png")

    with open(tmp_path / "captions.jsonl", "w") as f:
        for path, caption in from_folder:
            f.write(json.dumps({"file_name": path, "text": caption}) + "\n")
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(from_folder)
    for name in ("captions.jsonl", "captions.csv"):
        root2, rows = find_samples(images=str(images), captions=str(tmp_path / name))
        assert root2 == str(images) and rows == from_folder

    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        find_samples(images=str(tmp_path / "no_such_folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        find_samples(images=str(tmp_path / "empty"))
    os.remove(images / "c3.txt")
    with pytest.raises(ValueError, match=r"1 of 9 images .* no caption file.*c3\.webp"):
        find_samples(images=str(images))
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a0.png", "text": "ok"}\n{"url": "x", "text": "no path"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: need an image path column"):
        find_samples(images=str(images), captions=str(tmp_path / "bad.jsonl"))
    (tmp_path / "captions.txt").write_text("a0.png cat")
    with pytest.raises(ValueError, match="expected a .jsonl or .csv"):
        find_samples(captions=str(tmp_path / "captions.txt"))
    with pytest.raises(ValueError, match="multiple of 16"):
        prepare(from_folder, str(tmp_path / "out"), vae, 40, root=root)
    with pytest.raises(ValueError):
        find_samples()


def test_interface_of_embed_text_encoders():
    """prepare.py duck-types embed.TextEncoders; this checks the real class has that interface
    (its numerics are tested in tests/test_embed.py)."""
    import embed

    for name in ("from_pretrained", "encode", "encode_null"):
        assert callable(getattr(embed.TextEncoders, name, None)), name


def test_command_line(images, tmp_path, vae):
    """python prepare.py end to end (latents only, a DataLoader worker process, a Stability-layout
    VAE file), and that prepare.py does not need embed.py or diffusers for that."""
    vae_file = tmp_path / "tiny_vae.safetensors"
    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
    out = tmp_path / "cli"
    cmd = [sys.executable, "prepare.py", "--images", str(images), "--out", str(out), "--vae", str(vae_file),
           "--resolution", str(R), "--shard-size", "4", "--workers", "1", "--dtype", "fp32", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 unreadable images" in proc.stdout and "b_corrupt.jpg" in proc.stdout
    ds = ShardDataset(str(out), dtype=torch.float32)
    assert len(ds) == 7 and len(ds.index["shards"]) == 3 and ds[0]["latents"].dtype == torch.float32
    with pytest.raises(ValueError, match="no text embeddings"):
        ds.null()


def test_shard_dataset_checks_the_index_up_front_and_each_shard_when_read(images, tmp_path, vae):
    """index.json is parsed and every file it lists must exist, at construction; a shard's content is
    checked only when it is first read (a large set is never opened all at once), and a corrupt one is
    named with its path."""
    out = tmp_path / "out"
    run(images, out, vae, text_encoder=FakeTextEncoder())
    ShardDataset(str(out))[0]

    index = (out / "index.json").read_text()
    (out / "index.json").write_text(index[:len(index) // 2])
    with pytest.raises(ValueError, match=f"{out / 'index.json'} is corrupt"):
        ShardDataset(str(out))
    (out / "index.json").write_text('{"shards": "none"}')
    with pytest.raises(ValueError, match="index.json is not an index written by prepare.py"):
        ShardDataset(str(out))
    (out / "index.json").write_text(index)

    (out / "null.safetensors").rename(out / "null.moved")
    with pytest.raises(FileNotFoundError, match=r"index.json lists 1 file\(s\) missing .*null.safetensors"):
        ShardDataset(str(out))
    (out / "null.moved").rename(out / "null.safetensors")

    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    ds = ShardDataset(str(out))  # not opened yet
    assert ds[0]["caption"] and ds[1]["caption"]  # shard 0 is fine
    with pytest.raises(ValueError, match=f"{shard} is a corrupt shard .*SafetensorError"):
        ds[2]
    rows = ds.index["shards"][1]["num_samples"]
    save_file({"latents": torch.zeros(rows + 1, 16, 4, 4)}, str(shard), {"captions": json.dumps(["x"] * (rows + 1))})
    with pytest.raises(ValueError, match=f"{shard} holds .* rows and {rows + 1} captions, but index.json says {rows}"):
        ShardDataset(str(out))[2]


@pytest.mark.parametrize("case", ["resolution", "out-is-a-file", "no-vae"])
def test_command_line_refuses_bad_input_before_loading(images, tmp_path, case):
    """python prepare.py: one `error:` line naming the argument, exit 2, before the VAE loads."""
    vae_file, out, extra = tmp_path / "vae.safetensors", tmp_path / "out", []
    vae_file.write_bytes(b"never read")
    if case == "resolution":
        extra, names = ["--resolution", "40"], ["resolution 40 must be a positive multiple of 16"]
    elif case == "out-is-a-file":
        out.write_text("a file")
        names = [f"--out {out} is a file"]
    else:
        vae_file, names = tmp_path / "missing", [f"--vae {tmp_path / 'missing'}: no such file"]
    r = subprocess.run([sys.executable, "prepare.py", "--images", str(images), "--out", str(out), "--vae",
                        str(vae_file), "--device", "cpu", *extra], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(name in lines[0] for name in names), lines[0]
    assert r.stdout == "" and (out.is_file() or not out.exists())
