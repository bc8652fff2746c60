"""Tests for toy.py: the world and its split (no held-out scene reaches training), its scores (exact
on the world's own renders, low on wrong colour, shape, place, blank and blurred images), its text
encoders, the teacher's training, build_world's cache and the datasets (all tiny; seconds on a CPU)."""

import os

import pytest
import torch

import toy
from mmdit import load_mmdit


@pytest.fixture(autouse=True)
def one_thread():
    with toy.one_thread():  # tiny tensors: a second OpenMP thread only slows a shared CPU down
        yield


def real_samples(n, seed=0, pool=toy.ALL_PROMPTS):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.tensor(pool)[torch.randint(len(pool), (n,), generator=g)]  # (n, 5)
    return toy.render(prompts, g), prompts


def mirror(prompts):
    """The other caption of the same picture: "A left of B" <-> "B right of A"."""
    return prompts[:, [3, 4, 2, 0, 1]] ^ torch.tensor([0, 0, 1, 0, 0])


def test_prompts_split_by_scene_and_captions():
    assert len(toy.ALL_PROMPTS) == 24 * 23 * 2 == 1104
    splits = [set(toy.TRAIN_PROMPTS), set(toy.DEV_PROMPTS), set(toy.TEST_PROMPTS)]
    assert [len(s) for s in splits] == [804, 100, 200] and set.union(*splits) == set(toy.ALL_PROMPTS)
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    for split in splits:  # a prompt and its mirror (the same picture) are in the same split
        assert {tuple(p) for p in mirror(torch.tensor(sorted(split))).tolist()} == split
    for side, cols in (("A", (0, 1)), ("B", (3, 4))):  # every object, on either side of either relation, is trained
        for r in range(len(toy.RELATIONS)):
            assert {(p[cols[0]], p[cols[1]]) for p in toy.TRAIN_PROMPTS if p[2] == r} == set(toy.OBJECTS), side
    assert toy.caption(0, 1, 0, 2, 0) == "a red plus left of a blue square"
    assert len({toy.caption(*k) for k in toy.ALL_PROMPTS}) == 1104
    assert max(len(toy.caption(*k).split()) for k in toy.ALL_PROMPTS) + 2 <= toy.TOKENS


def test_render_range_layout_and_variety():
    x, prompts = real_samples(512)
    assert x.shape == (512, 3, toy.H, toy.W) and x.min() >= -1 and x.max() <= 1
    same = (prompts == prompts[0]).all(1)
    assert len({tuple(v.flatten().tolist()) for v in x[same]}) > 1  # one prompt, many images
    # a mirrored caption draws the same picture (up to the random placement and shade)
    one = torch.tensor([[0, 1, 0, 2, 0]])
    a, b = toy.render(one, torch.Generator().manual_seed(3)), toy.render(mirror(one), torch.Generator().manual_seed(3))
    lit_a, lit_b = a.amax(1) > 0, b.amax(1) > 0
    assert lit_a[..., :8].sum() == lit_b[..., :8].sum() == 20  # the plus, on the left
    assert a[0, 2, :, 8:].max() > 0 and a[0, 0, :, 8:].max() < 0  # the blue square on the right


def test_scores_are_exact_on_real_samples():
    x, prompts = real_samples(2000)
    s = toy.scores(x, prompts)
    assert all(v.min() == 1 for v in s.values()), {k: v.min().item() for k, v in s.items()}
    assert torch.equal(toy.scores(x, mirror(prompts))["adherence"], torch.ones(2000))  # same picture
    cells = toy.read_image(x)
    left = torch.where(prompts[:, 2] == 0, prompts[:, 0], prompts[:, 3])
    assert torch.equal(cells[:, 0, 1], left) and (cells[:, :, 3] == 0).all()  # colour, and exactly a template


@pytest.mark.parametrize("column, change", [(0, 1), (1, 1), (3, 2), (4, 3), (2, 1)])
def test_a_wrong_attribute_scores_zero(column, change):
    x, prompts = real_samples(600, seed=1)
    wrong = prompts.clone()
    n = (len(toy.COLOURS), len(toy.SHAPES), len(toy.RELATIONS))[[0, 1, 2, 0, 1][column]]
    wrong[:, column] = (wrong[:, column] + change) % n
    keep = (wrong[:, 0] != wrong[:, 3]) | (wrong[:, 1] != wrong[:, 4])  # still two different objects
    s = toy.scores(x[keep], wrong[keep])  # a colour, a shape or the relation (both places) wrong
    assert s["adherence"].sum() == 0
    assert s["clean"].min() == 1  # the drawings are still clean
    assert s["fidelity"].max() < 1 and s["fidelity"].mean() < 0.8


def test_scores_of_degraded_images():
    x, prompts = real_samples(300, seed=2)
    assert toy.scores(x + 0.1 * torch.randn_like(x), prompts)["adherence"].mean() >= 0.98  # mild noise read through
    blank = toy.scores(-torch.ones_like(x), prompts)
    assert all(v.max() == 0 for v in blank.values())  # a black image shows nothing
    assert toy.scores(x * 0.3 - 0.7, prompts)["adherence"].sum() == 0  # too faint: nothing is lit
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # smudged shapes: not clean, lower fidelity
    s = toy.scores(blur, prompts)
    assert s["clean"].mean() < 0.7 and s["fidelity"].mean() < 0.9, (s["clean"].mean(), s["fidelity"].mean())
    white = x.amax(1, keepdim=True).expand_as(x)  # every lit pixel white: no palette colour
    assert toy.scores(white, prompts)["adherence"].sum() == 0
    moved = torch.roll(x, shifts=8, dims=3)  # the two cells swapped: wrong places
    same = (prompts[:, 0] == prompts[:, 3]) & (prompts[:, 1] == prompts[:, 4])
    assert toy.scores(moved[~same], prompts[~same])["adherence"].sum() == 0


@pytest.fixture(scope="module")
def encoders():
    return toy.make_encoders()


def test_text_encoders_give_distinct_embeddings(encoders):
    prompts = toy.ALL_PROMPTS[::7]
    context, y = encoders.encode([toy.caption(*k) for k in prompts])
    n = len(prompts)
    assert context.shape == (n, toy.TOKENS, sum(toy.CLIP_WIDTHS)) and y.shape == (n, sum(toy.CLIP_WIDTHS))
    off = torch.eye(n, dtype=torch.bool)
    assert torch.cdist(y, y)[~off].min() > 1e-2
    assert torch.cdist(context.flatten(1), context.flatten(1))[~off].min() > 1e-2
    context_null, y_null = encoders.encode_null()
    assert context_null.shape == (1, toy.TOKENS, 64) and (y - y_null).norm(dim=1).min() > 1e-2
    again = toy.make_encoders(toy.encoder_state(encoders))  # build_world caches them
    torch.testing.assert_close(again.encode([toy.caption(*prompts[1])])[1], y[1:2])


def test_short_teacher_training_loss_falls(encoders, tmp_path):
    settings = toy.TrainSettings(steps=150, batch_size=16, weak_step=50)
    losses = toy.train_teacher(encoders, settings, str(tmp_path), progress=False)
    assert len(losses) == 150
    assert sum(losses[-30:]) / 30 < 0.7 * sum(losses[:30]) / 30
    teacher, weak = (load_mmdit(str(tmp_path / f)) for f in ("teacher.safetensors", "weak.safetensors"))
    assert teacher.config == toy.TEACHER_CONFIG
    assert any(not torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), weak.state_dict().values()))


TINY = toy.TrainSettings(steps=20, batch_size=8, weak_step=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_world(str(tmp_path_factory.mktemp("toy")), progress=False, settings=TINY)


def test_build_world_reuses_its_cache(world, monkeypatch):
    assert os.path.isfile(world.teacher_path) and os.path.isfile(world.weak_path)
    assert os.path.isfile(world.strong_path) and world.config == toy.TEACHER_CONFIG

    def no_training(*args, **kwargs):
        raise AssertionError("build_world trained again instead of reusing its cache")

    monkeypatch.setattr(toy, "train_teacher", no_training)
    again = toy.build_world(world.cache_dir, progress=False, settings=TINY)
    assert again.teacher_path == world.teacher_path and again.losses == world.losses
    prompts = ["a cyan bar right of a red square", ""]
    for a, b in zip(world.encoders.encode(prompts), again.encoders.encode(prompts)):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another teacher
        toy.build_world(world.cache_dir, progress=False, settings=toy.TrainSettings(steps=21, weak_step=10))
    # other arithmetic (here the MMDiT's output moved by 1e-7, as a faster kernel may move it): another teacher
    forward = toy.MMDiT.forward
    monkeypatch.setattr(toy.MMDiT, "forward", lambda self, *a, **k: forward(self, *a, **k) * (1 + 1e-7))
    with pytest.raises(AssertionError, match="trained again"):
        toy.build_world(world.cache_dir, progress=False, settings=TINY)


def test_dataset_items_and_null(world):
    train, test = world.dataset("train"), world.dataset("test")
    item = train[5]
    assert item["latents"].shape == (3, toy.H, toy.W) and item["latents"].dtype == torch.float32
    assert item["context"].shape == (toy.TOKENS, 64) and item["y"].shape == (64,)
    torch.testing.assert_close(world.encoders.encode([item["caption"]])[1][0], item["y"])
    assert torch.equal(train[5]["latents"], item["latents"])  # deterministic per index
    context_null, y_null = train.null()
    assert context_null.shape == (1, toy.TOKENS, 64) and y_null.shape == (1, 64)
    with pytest.raises(ValueError, match="split"):
        world.dataset("valid")
    # the held-out splits are clean renders of their prompts
    x = torch.stack([test[i]["latents"] for i in range(200)])
    assert toy.scores(x, test.prompts[torch.arange(200) % len(test.prompts)])["adherence"].min() == 1


def test_held_out_scenes_never_reach_training(world):
    """Neither the captions nor the pictures (caption noise included) of the training stream ever
    show a DEV or TEST scene: every training image, read back, is a training scene."""
    train = world.dataset("train")
    n = 3000
    captions = {train[i]["caption"] for i in range(0, n, 3)}
    assert captions <= {toy.caption(*p) for p in toy.TRAIN_PROMPTS}
    x = torch.stack([train[i]["latents"] for i in range(n)])
    cells = toy.read_image(x)  # (n, 2, 4): the left and the right object of each picture
    shown = {((a[1], a[2]), (b[1], b[2])) for a, b in cells[:, :, :3].tolist()}
    held_out = {((p[0], p[1]), (p[3], p[4])) for p in toy.TEST_PROMPTS + toy.DEV_PROMPTS if p[2] == 0}
    assert not shown & held_out and len(shown) > 300
    # the caption noise rate: the read-back scene differs from the caption's in about CAPTION_NOISE of images
    prompts = train.prompts[torch.arange(n) % len(train.prompts)]
    wrong = 1 - toy.scores(x, prompts)["adherence"].mean()
    assert abs(wrong - toy.CAPTION_NOISE) < 0.03


def test_caption_noise_draws_from_the_training_prompts():
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(toy.TRAIN_PROMPTS)
    prompts = pool[torch.randint(len(pool), (20000,), generator=g)]
    shown = toy.noisy_images(prompts, pool, g)
    assert abs((shown != prompts).any(1).float().mean() - toy.CAPTION_NOISE * (1 - 1 / len(pool))) < 0.02
    assert set(map(tuple, shown.tolist())) <= set(toy.TRAIN_PROMPTS)
