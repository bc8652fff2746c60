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
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from run import batches
import prepare as prepare_module
from prepare import ShardDataset, find_samples, prepare
from sd3.vae import VAE, from_pil, load_image
from sd3 import text_encoders

R = 32  # resolution: latents (16, 4, 4)
GOOD = {  # name -> (size, mode)
    "a0.png": ((40, 32), "RGB"), "a1.jpg": ((32, 48), "RGB"), "c2.png": ((64, 64), "RGBA"),
    "c3.webp": ((33, 35), "RGB"), "e4.jpg": ((50, 40), "L"), "e5.png": ((36, 36), "P"), "f6.png": ((32, 32), "RGB"),
}
BAD = ("b_corrupt.jpg", "d_truncated.png")  # sorted order puts one bad image in each of shards 0 and 1


class FakeTextEncoder:
    """text_encoders.TextEncoders' interface at toy sizes (L=5, Dc=8, Dy=6): a deterministic function of
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
    kw = dict(dict(shard_size=3, batch_size=2, workers=0, progress=False, buckets="square"), **kw)
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
    # square shards, written as before buckets (one "latents" tensor, no sizes): one bucket
    assert "buckets" not in index and ds.bucket_ids is None and ds.bucket_sizes is None
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
        prepare(samples, str(out), vae, 48, root=root, shard_size=3, workers=0, progress=False, buckets="square")
    samples[4] = (samples[4][0], "a different caption")
    with pytest.raises(ValueError, match="shard-00001.safetensors holds other images/captions"):
        prepare(samples, str(out), vae, R, root=root, shard_size=3, workers=0, progress=False, buckets="square")
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
    """prepare.py duck-types text_encoders.TextEncoders; this checks the real class has that interface
    (its numerics are tested in tests/test_embed.py)."""

    for name in ("from_pretrained", "encode", "encode_null"):
        assert callable(getattr(text_encoders.TextEncoders, name, None)), name


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


def test_sample_shapes_refuse_an_index_or_null_prompt_of_other_files(images, tmp_path, vae):
    """What distill.py checks --data with (sample_shapes): index.json's recorded shapes, the first shard's
    header and null.safetensors must agree; an index of other shards or a null prompt of other text
    encoders is refused naming the files, before any network loads."""
    from prepare import read_index, sample_shapes

    out = tmp_path / "out"
    run(images, out, vae, text_encoder=FakeTextEncoder())
    shapes = sample_shapes(str(out), read_index(str(out)))
    assert len(shapes["latents"]) == 3 and len(shapes["context"]) == 2 and len(shapes["y"]) == 1
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(dict(index, latent_shape=[16, 2, 2])))
    with pytest.raises(ValueError, match=r"index.json records latents of shape \[16, 2, 2\], but shard-00000"):
        sample_shapes(str(out), read_index(str(out)))
    (out / "index.json").write_text(json.dumps(index))
    null = load_file(str(out / "null.safetensors"))
    save_file({"context": null["context"][:, :, :3].contiguous(), "y": null["y"]}, str(out / "null.safetensors"))
    with pytest.raises(ValueError, match="null.safetensors: the null prompt's context is .* not of the same text"):
        sample_shapes(str(out), read_index(str(out)))


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


# -----------------------------------------------------------------------------
# Buckets: images keep their aspect ratio, a global batch draws from one bucket


def test_buckets_keep_aspect_within_the_stated_tolerance():
    """Every bucket: multiples of 16, an area within 10% of R^2; for every aspect ratio between 9:16 and
    16:9 the nearest bucket's is within a factor 1.14 (prepare.py's docstring), at R >= 128."""
    assert prepare_module.bucket_sizes(1024) == [(1360, 768), (1248, 832), (1152, 912), (1024, 1024), (912, 1152),
                                                 (832, 1248), (768, 1360)]  # (height, width), as documented
    assert prepare_module.bucket_sizes(1024, "square") == [(1024, 1024)]
    assert prepare_module.bucket_sizes(64) == [(80, 48), (64, 64), (48, 80)] and prepare_module.bucket_sizes(32) == [
        (32, 32)]
    aspects = np.exp(np.linspace(np.log(9 / 16), np.log(16 / 9), 2001))  # width / height
    for R in (128, 256, 512, 768, 1024, 1536):
        sizes = prepare_module.bucket_sizes(R)
        assert all(h % 16 == 0 and w % 16 == 0 and abs(h * w / R**2 - 1) <= 0.1 for h, w in sizes)
        worst = 1.0
        for a in aspects:
            h, w = sizes[prepare_module.nearest_bucket(a * 100, 100, sizes)]
            worst = max(worst, max(w / h / a, a * h / w))
        assert worst <= 1.14, (R, worst)
        # by hand: the chosen bucket has the smallest |log| ratio gap of all
        for a in (0.6, 0.8, 1.1, 1.4, 1.7):
            gaps = [abs(np.log(w / h / a)) for h, w in sizes]
            assert prepare_module.nearest_bucket(a * 300, 300, sizes) == int(np.argmin(gaps))


def test_aspect_buckets_end_to_end(tmp_path, vae):
    """prepare.py --buckets aspect at R = 64 on images of seven aspect ratios: each sample's latent has its
    bucket's size and equals the VAE's encoding of the image resized to cover the bucket and centre-cropped
    (done here by hand); the shards record each sample's size; index.json the buckets."""
    sizes = {"wide.png": (200, 90), "landscape.png": (90, 60), "square.png": (70, 70), "tall.png": (50, 90),
             "portrait.png": (60, 72), "near.png": (66, 60), "skinny.png": (30, 120)}  # (width, height)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for k, (name, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption {k}")
    root, samples = find_samples(images=str(folder))
    index = prepare(samples, str(tmp_path / "out"), vae, 64, root=root, shard_size=4, batch_size=3, workers=0,
                    progress=False, dtype=torch.float32, posterior="mean", text_encoder=FakeTextEncoder())["index"]
    buckets = [tuple(b["size"]) for b in index["buckets"]]
    assert buckets == [(80, 48), (64, 64), (48, 80)] and index["latent_shape"] is None
    ds = ShardDataset(str(tmp_path / "out"))
    assert ds.bucket_sizes == buckets and len(ds.bucket_ids) == len(ds) == 7
    for i in range(len(ds)):
        item = ds[i]
        name = item["caption"].split()[-1]
        w, h = sizes[list(sizes)[int(name)]]
        H, W = buckets[ds.bucket_ids[i]]
        assert H % 16 == 0 and W % 16 == 0
        gaps = [abs(np.log((bw / bh) / (w / h))) for bh, bw in buckets]
        assert ds.bucket_ids[i] == int(np.argmin(gaps))  # the nearest aspect ratio
        # resize to cover the bucket (bicubic), then the centre crop, by hand
        image = Image.open(folder / list(sizes)[int(name)]).convert("RGB")
        s = max(W / w, H / h)
        big = image.resize((max(W, round(w * s)), max(H, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (big.width - W) // 2, (big.height - H) // 2
        expected = vae.encode(from_pil(big.crop((left, top, left + W, top + H))))[0]  # (16, H/8, W/8)
        assert item["latents"].shape == (16, H // 8, W // 8)
        torch.testing.assert_close(item["latents"], expected, rtol=1e-5, atol=1e-5)
    counts = {tuple(b["size"]): b["num_samples"] for b in index["buckets"]}
    assert counts == {(80, 48): 2, (64, 64): 3, (48, 80): 2}  # tall, skinny | square, portrait, near | wide, landscape
    with safe_open(str(tmp_path / "out" / "shard-00000.safetensors"), framework="pt") as f:
        held = json.loads(f.metadata()["sizes"])
        assert sorted(f.keys()) == sorted({f"latents_{h}x{w}" for h, w in held} | {"context", "y"})
    assert index["bytes_per_sample"] == 4 * (sum(16 * h * w // 64 * n for (h, w), n in counts.items()) // 7 + 5 * 8 + 6)


def test_a_global_batch_never_mixes_buckets_and_ranks_still_agree():
    """batches.StepSampler over bucketed data: each step's global batch is from one bucket; one process
    and 2 ranks x 2 accumulation rounds yield the same samples and positions; a resume at step 7 yields
    the rest of the same stream; each bucket's samples are all used once per its epoch; the buckets are
    drawn in proportion to their sizes; one bucket is the stream without buckets."""
    bucket_of = [0] * 30 + [1] * 50 + [2] * 20  # 100 samples, interleaved below
    rng = np.random.default_rng(0)
    bucket_of = [bucket_of[i] for i in rng.permutation(100)]
    G, steps = 8, 400

    def stream(rank=0, world=1, micro=G, start=0):
        sampler = batches.StepSampler(100, 3, start, steps, G, micro, rank, world, buckets=bucket_of)
        return list(sampler)

    one = stream()
    per_step = [one[s * G:(s + 1) * G] for s in range(steps)]
    assert all(len({bucket_of[i] for i, _ in batch}) == 1 for batch in per_step)
    assert all([p for _, p in batch] == list(range(s * G, (s + 1) * G)) for s, batch in enumerate(per_step))
    two = [stream(rank=r, world=2, micro=2) for r in range(2)]  # 2 ranks, micro 2, 2 rounds per step
    for s in range(steps):
        rounds = [two[r][s * 4 + a * 2:s * 4 + a * 2 + 2] for a in range(2) for r in range(2)]
        assert [x for part in rounds for x in part] == per_step[s]
    assert stream(start=7) == one[7 * G:]
    shares = np.bincount([bucket_of[batch[0][0]] for batch in per_step], minlength=3) / steps
    assert np.abs(shares - [0.3, 0.5, 0.2]).max() < 0.07
    first = [batch for batch in per_step if bucket_of[batch[0][0]] == 2][:20 // G + 2]  # bucket 2's first epoch
    seen = [i for batch in first for i, _ in batch][:20]
    assert sorted(seen) == sorted(i for i in range(100) if bucket_of[i] == 2)
    single = list(batches.StepSampler(100, 3, 0, 20, G, G, 0, 1, buckets=[5] * 100))
    plain = list(batches.StepSampler(100, 3, 0, 20, G, G, 0, 1))
    epoch = lambda e: torch.randperm(100, generator=torch.Generator().manual_seed(3 * 2**20 + e))  # noqa: E731
    assert single == plain == [(int(epoch(p // 100)[p % 100]), p) for p in range(20 * G)]


def test_distill_trains_on_bucketed_shards(tmp_path, vae):
    """distill.py on aspect-bucketed shards (a tiny MMDiT that takes the tiny VAE's 16 channels and the
    fake text encoder's widths): every global batch stacks one size (a mixed one could not be collated)."""
    import distill
    from run import options
    from mmdit import MMDiT, MMDiTConfig, save_mmdit
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for k, (w, h) in enumerate([(90, 50), (64, 64), (50, 90), (100, 56), (70, 70), (48, 80)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"caption {k}")
    root, samples = find_samples(images=str(folder))
    prepare(samples, str(tmp_path / "data"), vae, 64, root=root, shard_size=4, workers=0, progress=False,
            text_encoder=FakeTextEncoder())
    torch.manual_seed(0)
    teacher = save_mmdit(MMDiT(MMDiTConfig(depth=1, hidden_size=32, num_heads=2, in_channels=16, out_channels=16,
                                           context_dim=8, pooled_dim=6, pos_embed_max_size=8)),
                         str(tmp_path / "teacher.safetensors"))
    seen = []
    forward = distill.Student.forward
    distill.Student.forward = lambda self, x_t, *a: seen.append(tuple(x_t.shape[-2:])) or forward(self, x_t, *a)
    try:
        distill.main(options.parse_args(["--teacher", teacher, "--data", str(tmp_path / "data"), "--out",
                                         str(tmp_path / "run"), "--teacher-sampler", "cfg", "--steps", "6",
                                         "--global-batch", "2", "--no-progress", "--device", "cpu"]))
    finally:
        distill.Student.forward = forward
    # 6 steps, and the finite check's forward before the last checkpoint
    assert len(seen) == 7 and set(seen) <= {(10, 6), (8, 8), (6, 10)} and len(set(seen)) > 1
