"""evaluation/toy_study.py: Eq. 7's fused term at initialisation against a by-hand computation, the study's runs
(trained with distill.py, scored on DEV, resumable: a relaunch reuses every scored point), its curves, and
the bf16-rounding measurement, on the tiny toy world of tests/evaluation/test_toy_report.py."""

import json
import os

import pytest
import torch

import oracles  # tests/oracles.py
import toy
from evaluation import toy_study
from test_toy_report import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_world(str(tmp_path_factory.mktemp("toy")), progress=False, settings=TINY)


def test_parse_config():
    assert toy_study.parse_config("teefusion") == dict(method="teefusion", fused_scale=None, target="step",
                                                       teacher="w2sd", lr=None, name="teefusion")
    c = toy_study.parse_config("teefusion:1/4:reflected")
    assert c["fused_scale"] == 0.25 and c["target"] == "reflected" and c["name"] == "teefusion-s0.25-reflected"
    c = toy_study.parse_config("distillcfg:::cfg:3e-4")
    assert (c["teacher"], c["lr"], c["fused_scale"], c["name"]) == ("cfg", 3e-4, None, "distillcfg-cfg-lr0.0003")
    for bad in ("nope", "teefusion:x", "teefusion:1/0", "teefusion:1:other", "teefusion:::euler", "a:b:c:d:e:f",
                "teefusion::::fast"):
        with pytest.raises(ValueError, match="--config"):
            toy_study.parse_config(bad)


def test_fused_ratio_by_hand(world):
    model = world.load("teacher")
    ds = world.dataset("dev")
    y, y_null = ds.y[:16], world.encoders.encode_null()[1]
    with torch.no_grad():
        table = toy_study.ratio_table(model, y, y_null)
        for (t, w), r in table.items():
            G, F = model.t_embedder.mlp, model.y_embedder.mlp
            c = oracles.mlp(G, oracles.psi(torch.full((16,), t))) + oracles.mlp(F, y)
            fused = oracles.mlp(G, oracles.psi(torch.full((16,), w))) * oracles.mlp(F, y - y_null)
            assert r == pytest.approx((fused.norm(dim=1) / c.norm(dim=1)).median().item(), rel=1e-4)
    text = toy_study.format_ratio(table, model.config.hidden_size, "tiny")
    assert "scale 1/256 (release)" in text and len(text.splitlines()) == 2 + len(table)


def test_runs_score_each_budget_and_resume(world, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "build_world", lambda *a, **k: world)  # the tiny world instead of cache/toy
    monkeypatch.chdir(tmp_path)
    argv = ["runs", "--out", "study", "--budgets", "2,4", "--config", "teefusion", "--config",
            "teefusion:1/4:reflected", "--no-progress", "--seeds", "1", "--sample-steps", "2"]
    parser_args = toy_study.build_parser().parse_args(argv)
    results = toy_study.main(parser_args)
    assert set(results) == {"teefusion", "teefusion-s0.25-reflected"}
    for name, points in results.items():
        assert set(points) == {"2", "4"}
        for p in points.values():
            for key in ("rmse", "cfg_rmse", "follows", "teacher_follows", "follows_ratio", "adherence"):
                mean, lo, hi = p[key]
                assert lo <= mean <= hi, (name, key)
            assert p["closer_than_cfg"]["diff"] == pytest.approx(p["rmse"][0] - p["cfg_rmse"][0], abs=1e-9)
    with open("study/teefusion-s0.25-reflected/log.jsonl") as f:
        assert len(f.readlines()) == 4  # trained to 2, then resumed to 4
    for name in ("study-rmse.png", "study-follows_ratio.png", "study-adherence.png", "study.md", "study.json"):
        assert os.path.isfile(os.path.join("study", name)), name
    trained = []
    monkeypatch.setattr(toy_study, "train_to", lambda *a: trained.append(a))
    again = toy_study.main(parser_args)  # a relaunch: every point is already scored
    assert not trained and again == json.load(open("study/study.json"))["results"]


def test_rounding_of_w(world, tmp_path, monkeypatch, capsys):
    import mmdit

    monkeypatch.setattr(toy, "build_world", lambda *a, **k: world)
    path = mmdit.save_mmdit(world.load("teacher"), str(tmp_path / "s.safetensors"),
                            {"teefusion_method": "teefusion", "teefusion_teacher": "w2sd"})
    text = toy_study.main(toy_study.build_parser().parse_args(["rounding", "--student", path, "--ws", "5", "--seeds", "1",
                                                                    "--sample-steps", "2"]))
    assert "4992" in text  # 5000 in bf16
    with pytest.raises(ValueError, match="needs --student"):
        toy_study.main(toy_study.build_parser().parse_args(["rounding"]))
