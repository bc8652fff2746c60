"""
Tests for benchmarks/gpu_check.py, every part on the CPU at tiny sizes (no GPU needed):
  - forward_flops equals torch's FLOP counter over a real forward (its attention run as matmuls, which
    the counter sees), for SD3, SD3.5-medium (dual attention) and SD3.5-large (qk norm) layouts; the
    forward rows' TFLOP/s and MFU are that count over their time and over the peak;
  - the forward rows time mmdit.py and diffusers on the same weights, eager and compiled (the eager
    backend of torch.compile: the graph capture without a C++ compiler), and agree with diffusers;
  - the memory probe counts every live byte (an exact synthetic case), and one distillation step
    measures what benchmarks/bench_memory.py measures at the same sizes (LoRA below full);
  - the sampling rows count 1 NFE per student step and 6 per W2SD + CFG step (2 on the last);
  - the table prints every row in one table; the device peak table; main refuses on a CPU.

    python -m pytest -q tests/run/test_gpu_check.py
"""

import dataclasses
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_memory  # noqa: E402
from run import cli  # noqa: E402
import gpu_check  # noqa: E402
import mmdit  # noqa: E402



def math_attention(qkv):
    """Softmax attention as plain matmuls (FLOP counter sees them; CPU SDPA kernels it does not)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, hs)
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, nh, L, L)
    return (a @ v).transpose(1, 2).flatten(2)  # (B, L, D)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5-medium", "tiny-sd3.5-large"])
def test_forward_flops_equals_torch_flop_counter(name, monkeypatch):
    cfg = mmdit.CONFIGS[name]
    model = bench_memory.random_mmdit(cfg, torch.float32, 0)
    side, text = 8, 5  # (side / 2)^2 = 16 image tokens
    x, t, context, y = gpu_check.inputs(cfg, side, text, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(mmdit, "attention", math_attention)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, context, y)
    assert counter.get_total_flops() == gpu_check.forward_flops(cfg, (side // cfg.patch_size) ** 2, text)
    assert gpu_check.forward_flops(cfg, 16, text, batch=3) == 3 * gpu_check.forward_flops(cfg, 16, text)


@pytest.fixture(scope="module")
def forward_rows():
    torch.manual_seed(0)
    return gpu_check.forward_rows(torch.device("cpu"), mmdit.CONFIGS["tiny-sd3"], 8, 5, dtype=torch.float32,
                                  compile_backend="eager", peak_tflops=0.5, warmup=1, iters=3)


def test_forward_rows_time_mmdit_and_diffusers_eager_and_compiled(forward_rows):
    cfg = mmdit.CONFIGS["tiny-sd3"]
    flops = gpu_check.forward_flops(cfg, 16, 5)
    assert [r["what"] for r in forward_rows] == ["mmdit.py, eager", "diffusers, eager", "mmdit.py, compiled",
                                                 "diffusers, compiled"]
    for r in forward_rows:
        assert r["ms"] > 0
        assert r["tflops"] == pytest.approx(flops / (r["ms"] / 1e3) / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-12)
        assert float(r["note"].rsplit(" ", 1)[1]) < 1e-4  # the same weights give diffusers' output


def test_device_peak_by_name_and_given():
    assert gpu_check.device_peak("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert gpu_check.device_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_check.device_peak("NVIDIA H200")[0] == 989.4
    assert gpu_check.device_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert gpu_check.device_peak("Some New GPU") == (None, "unknown device: give --peak-tflops for the MFU column")
    assert gpu_check.device_peak("NVIDIA H100 PCIe", given=700.0) == (700.0, "--peak-tflops")
    assert gpu_check.mfu(100.0, None) is None


def test_memory_probe_counts_every_live_byte():
    """4000 bytes live before the step, 8000 more during it (then freed): the peak is 12000."""
    def build():
        return torch.empty(1000, dtype=torch.float32)

    def step(_):
        b = torch.empty(2000, dtype=torch.float32)
        del b

    assert gpu_check.peak_during(torch.device("cpu"), build, step) == 12000


def test_distillation_step_peak_is_bench_memorys_measurement():
    """The same step (W2SD pair in bf16, --bf16, checkpointing, batch 1) as bench_memory measures it phase by
    phase in its own process, here at depth 2 and width 64: the same peak within 1%, the same again
    in one process; LoRA r4 below half of it."""
    cfg = mmdit.CONFIGS["tiny-sd3"]
    point = dict(config="tiny-sd3", depth=cfg.depth, side=4, text=8, ckpt=True, lora=None)  # 4 x 4 patches
    bench = max(bench_memory.run_point(point, 1, "foreach")["peaks"].values())  # its own fresh process
    full = gpu_check.distillation_step_peak(torch.device("cpu"), cfg, 8, 8)
    lora = gpu_check.distillation_step_peak(torch.device("cpu"), cfg, 8, 8, lora_rank=4)
    again = gpu_check.distillation_step_peak(torch.device("cpu"), cfg, 8, 8)
    print(f"bench_memory {bench} B, gpu_check {full} B, LoRA {lora} B")
    assert full == pytest.approx(bench, rel=0.01) and again == full
    assert 0 < lora < full / 2


def test_expected_step_peak_without_points_is_none(tmp_path):
    assert gpu_check.expected_step_peak(None, "sd3-medium", 24, 4429) is None
    assert gpu_check.expected_step_peak(str(tmp_path / "none.json"), "sd3-medium", 24, 4429) is None


def test_sampling_rows_count_the_network_evaluations():
    rows = gpu_check.sampling_rows(torch.device("cpu"), mmdit.CONFIGS["tiny-sd3"], 8, 5, steps=3,
                                   dtype=torch.float32)
    student, teacher = rows
    assert (student["nfe"], teacher["nfe"]) == (3, 6 * 2 + 2)
    assert student["s"] > 0 and teacher["s"] > 0
    assert student["note"] == f"teacher / student {teacher['s'] / student['s']:.2f}x wall, {14 / 3:.2f}x NFE"


def test_table_prints_every_row(forward_rows):
    rows = forward_rows + [dict(part="memory", what="distillation step, full student", peak_gb=49.21,
                                expected_gb=49.2, note="measured / CPU fit 1.00"),
                           dict(part="sampling", what="student, 50 steps", s=1.5, nfe=50, note="")]
    text = gpu_check.table(rows)
    lines = text.splitlines()
    print(text)
    assert len(lines) == 1 + len(rows)
    assert lines[0].split()[:3] == ["part", "what", "ms"] and "CPU fit GB" in lines[0] and "MFU" in lines[0]
    memory = lines[-2].split()
    assert memory[:4] == ["memory", "distillation", "step,", "full"] and "49.2" in memory and "1.00" in memory
    assert lines[-1].split()[:4] == ["sampling", "student,", "50", "steps"] and "1.50" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_main_refuses_without_a_gpu(capsys):
    """python benchmarks/gpu_check.py (cli.run on its parser, as its __main__ runs it): one error line, status 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(gpu_check.main, gpu_check.build_parser(), [])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: gpu_check.py measures a CUDA GPU")
    assert out == ""


def test_forward_flops_at_sd3_medium_1024(monkeypatch):
    """The count main uses (SD3-medium, depth 24, 4096 image + 333 text tokens) against the FLOP counter
    over a forward on the meta device (shapes only: no memory, no time)."""
    cfg = dataclasses.replace(mmdit.CONFIGS["sd3-medium"], depth=24)
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
        x, t = torch.empty(1, 16, 128, 128), torch.empty(1)
        context, y = torch.empty(1, 333, cfg.context_dim), torch.empty(1, cfg.pooled_dim)
    monkeypatch.setattr(mmdit, "attention", math_attention)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, context, y)
    flops = gpu_check.forward_flops(cfg, 4096, 333)
    assert counter.get_total_flops() == flops
    print(f"SD3-medium 1024x1024 forward: {flops / 1e12:.2f} TFLOP")
