"""Tests for toy.py: the world, its exact adherence score, its text encoders, the teacher's
training, build_world's cache, the datasets, the report and the several-student report of
`distill.py --full` (all tiny; seconds on a CPU)."""

import os

import pytest
import torch
from safetensors.torch import save_file

import embed
import samplers
import toy
from mmdit import load_mmdit, save_mmdit


@pytest.fixture(autouse=True)
def one_thread():
    with toy.one_thread():  # tiny tensors: a second OpenMP thread only slows a shared CPU down
        yield


def real_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.tensor(toy.ALL_PROMPTS)[torch.randint(len(toy.ALL_PROMPTS), (n,), generator=g)]  # (n, 3)
    return toy.render(prompts, g), prompts


def test_prompts_split_and_captions():
    assert len(toy.ALL_PROMPTS) == 112 and len(toy.TEST_PROMPTS) == 16
    assert not set(toy.TEST_PROMPTS) & set(toy.TRAIN_PROMPTS)
    for i, n in enumerate((len(toy.COLOURS), len(toy.SHAPES), len(toy.POSITIONS))):
        assert {k[i] for k in toy.TRAIN_PROMPTS} == set(range(n))  # every word is seen in training
    assert toy.caption(0, 1, 2) == "a red plus in row two column one"
    assert len({toy.caption(*k) for k in toy.ALL_PROMPTS}) == 112


def test_render_range_and_variety():
    x, prompts = real_samples(512)
    assert x.shape == (512, 3, toy.SIZE, toy.SIZE) and x.min() >= -1 and x.max() <= 1
    same = (prompts == prompts[0]).all(1)
    assert len({tuple(v.flatten().tolist()) for v in x[same]}) > 1  # one prompt, many images


def test_adherence_is_exact_on_real_samples():
    x, prompts = real_samples(3000)
    assert toy.adherence(x, prompts).mean() >= 0.98  # the brief's bar; it is in fact exact
    assert toy.adherence(x, prompts, scored=(0, 1, 2)).mean() == 1
    assert torch.equal(toy.read_image(x), prompts)
    # every attribute matters: a wrong colour, shape or position scores 0
    for i, n in enumerate((len(toy.COLOURS), len(toy.SHAPES), len(toy.POSITIONS))):
        if n == 1:
            continue
        wrong = prompts.clone()
        wrong[:, i] = (wrong[:, i] + 1) % n
        assert toy.adherence(x, wrong, scored=(0, 1, 2)).sum() == 0
        assert toy.adherence(x, wrong).sum() == (0 if i in toy.SCORED else len(x))


def test_adherence_of_degraded_images():
    x, prompts = real_samples(200, seed=1)
    assert toy.adherence(x + 0.1 * torch.randn_like(x), prompts).mean() >= 0.98  # mild noise is read through
    assert toy.adherence(-torch.ones_like(x), prompts).sum() == 0  # a black image shows nothing
    assert (toy.read_image(-torch.ones_like(x[:2])) == -1).all()
    assert toy.adherence(x * 0.3 - 0.7, prompts).sum() == 0  # too faint: nothing is lit
    grey = x.clone()
    grey[:] = grey.amax(1, keepdim=True)  # every lit pixel white
    assert toy.adherence(grey, prompts).mean() == (prompts[:, 0] == list(toy.COLOURS).index("white")).float().mean()


@pytest.fixture(scope="module")
def encoders():
    return toy.make_encoders()


def test_text_encoders_give_distinct_embeddings(encoders):
    context, y = encoders.encode([toy.caption(*k) for k in toy.ALL_PROMPTS])
    assert context.shape == (112, toy.TOKENS, sum(toy.CLIP_WIDTHS)) and y.shape == (112, sum(toy.CLIP_WIDTHS))
    off = torch.eye(112, dtype=torch.bool)
    assert torch.cdist(y, y)[~off].min() > 1e-2
    assert torch.cdist(context.flatten(1), context.flatten(1))[~off].min() > 1e-2
    context_null, y_null = encoders.encode_null()
    assert context_null.shape == (1, toy.TOKENS, 64) and (y - y_null).norm(dim=1).min() > 1e-2
    # saved and rebuilt encoders give the same embeddings (build_world caches them)
    again = toy.make_encoders(toy.encoder_state(encoders))
    torch.testing.assert_close(again.encode([toy.caption(*toy.ALL_PROMPTS[1])])[1], y[1:2])


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
    prompts = ["a cyan bar in row two column two", ""]
    for a, b in zip(world.encoders.encode(prompts), again.encoders.encode(prompts)):
        assert torch.equal(a, b)
    # other settings are another teacher: it trains
    with pytest.raises(AssertionError, match="trained again"):
        toy.build_world(world.cache_dir, progress=False, settings=toy.TrainSettings(steps=21, weak_step=10))


def test_dataset_items_and_null(world):
    train, test = world.dataset("train"), world.dataset("test")
    item = train[5]
    assert item["latents"].shape == (3, toy.SIZE, toy.SIZE) and item["latents"].dtype == torch.float32
    assert item["context"].shape == (toy.TOKENS, 64) and item["y"].shape == (64,)
    assert isinstance(item["caption"], str)
    torch.testing.assert_close(world.encoders.encode([item["caption"]])[1][0], item["y"])
    assert torch.equal(train[5]["latents"], item["latents"])  # deterministic per index
    context_null, y_null = train.null()
    assert context_null.shape == (1, toy.TOKENS, 64) and y_null.shape == (1, 64)
    test_captions = {test[i]["caption"] for i in range(32)}
    assert len(test_captions) == 16
    assert not test_captions & {train[i]["caption"] for i in range(len(toy.TRAIN_PROMPTS))}
    with pytest.raises(ValueError, match="split"):
        world.dataset("valid")
    # the test split is clean; the train split has web-like caption noise (CAPTION_NOISE)
    x = torch.stack([test[i]["latents"] for i in range(40)])
    assert toy.adherence(x, torch.stack([test.prompt(i) for i in range(40)])).mean() == 1
    x = torch.stack([train[i]["latents"] for i in range(400)])
    clean = toy.adherence(x, torch.stack([train.prompt(i) for i in range(400)])).mean()
    assert abs(clean - (1 - toy.CAPTION_NOISE)) < 0.1


def test_caption_noise_rate():
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(toy.TRAIN_PROMPTS)
    prompts = pool[torch.randint(len(pool), (20000,), generator=g)]
    shown = toy.noisy_images(prompts, pool, g)
    assert abs((shown != prompts).any(1).float().mean() - toy.CAPTION_NOISE * (1 - 1 / len(pool))) < 0.02
    assert set(map(tuple, shown.tolist())) <= set(toy.TRAIN_PROMPTS)  # noise never shows a held-out prompt


def test_report_table_and_grid(world, tmp_path, capsys):
    # the teacher stands in for a student: the plumbing, NFE and files are what is tested here
    out = toy.report(world, world.teacher_path, out_dir=str(tmp_path), steps=3, w=2.0, n_prompts=4,
                     grid_w=(0.0, 2.0), progress=False)
    rows = out["rows"]
    assert list(rows) == [name for name, _ in toy.ROWS]
    assert [rows[n]["nfe"] for n, _ in toy.ROWS] == [3, 6, 14, 14, 3]  # 6 (N - 1) + 2 for reflection
    assert rows["W2SD + CFG"]["rmse_to_teacher"] == 0
    assert all(0 <= r["adherence"] <= 100 and r["seconds_per_image"] > 0 for r in rows.values())
    assert os.path.isfile(tmp_path / "samples.png") and os.path.isfile(tmp_path / "table.json")
    assert "W2SD + CFG" in capsys.readouterr().out
    assert samplers.canonical("w2sd", samplers.TEACHERS) == out["teacher"]


def test_report_students_samples_each_student_with_its_fusion_and_teacher(world, tmp_path, capsys):
    """distill.py --full's table on tiny pieces: four "students" (the teacher's weights saved with
    save_mmdit, with a fusion.safetensors for distillcfg and dice as distill.py writes it), each row
    sampled with its own fusion module and compared with the teacher it was distilled from."""
    students, fusions = [], {}
    for method, teacher in (("teefusion", "cfg"), ("gonly", "w2sd"), ("distillcfg", "w2sd"), ("dice", "zsampling")):
        folder = tmp_path / method
        path = save_mmdit(load_mmdit(world.teacher_path), str(folder / "student.safetensors"))
        fusion = embed.make_fusion(method, world.config)
        if len(fusion.state_dict()):
            torch.manual_seed(1)
            with torch.no_grad():  # trained-looking weights: a fresh module may start as a no-op
                for p in fusion.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            save_file({k: v.contiguous() for k, v in fusion.state_dict().items()}, str(folder / "fusion.safetensors"))
        students.append(dict(path=path, method=method, teacher=teacher))
        fusions[method] = fusion.eval()
    out = toy.report_students(world, students, out_dir=str(tmp_path / "full"), steps=2, w=2.0, n_prompts=4,
                              grid_w=(2.0,), progress=False)
    rows = out["rows"]
    labels = ["TeEFusion <- Euler + CFG", "G only <- W2SD + CFG", "DistillCFG <- W2SD + CFG",
              "DICE <- Z-Sampling + CFG"]
    assert list(rows) == [name for name, m in toy.ROWS if m != "student"] + labels
    assert [rows[n]["teacher"] for n in labels] == ["cfg", "w2sd", "w2sd", "zsampling"]
    assert all(rows[n]["nfe"] == 2 and rows[n]["student_method"] == s["method"] for n, s in zip(labels, students))
    assert rows["W2SD + CFG"]["rmse_to_teacher"] == 0 and rows["W2SD + CFG"]["teacher"] == "w2sd"
    assert os.path.isfile(tmp_path / "full" / "samples.png") and os.path.isfile(tmp_path / "full" / "table.json")
    printed = capsys.readouterr().out
    assert all(n in printed for n in labels)

    # the DICE row is samplers.sample("student", ..., fusion=the saved module) against ITS teacher
    model, fusion = toy.load_student(students[3]["path"], "dice")
    assert all(torch.equal(a, b) for a, b in zip(fusion.state_dict().values(), fusions["dice"].state_dict().values()))
    prompts, context, y, noise = toy.test_batch(world, 4)
    models = {k: world.load(k) for k in ("teacher", "strong", "weak")}
    x_s = toy.run_sampler("student", world, {**models, "student": model}, noise, context, y, 2.0, 2, fusion)[0]
    x_t = toy.run_sampler("zsampling", world, models, noise, context, y, 2.0, 2)[0]
    torch.testing.assert_close(rows[labels[3]]["rmse_to_teacher"], (x_s - x_t).pow(2).mean().sqrt().item())
    fresh = embed.make_fusion("dice", world.config).eval()  # untrained: other images, so the fusion was used
    assert not torch.equal(toy.run_sampler("student", world, {**models, "student": model}, noise, context, y, 2.0,
                                           2, fresh)[0], x_s)

    os.remove(tmp_path / "distillcfg" / "fusion.safetensors")
    with pytest.raises(FileNotFoundError, match="fusion.safetensors: the 'distillcfg' student .* needs its"):
        toy.report_students(world, students, out_dir=str(tmp_path / "full"), steps=2, n_prompts=4, progress=False)
