"""
Tests for run/parallel.py: distill.py --fsdp (torch's fully_shard) on CPU with 2 gloo ranks, against one process:
  - FSDP training equals one process with the same global batch, to the DDP test's tolerance (the
    Adam floor), checkpoint by checkpoint, with gradient clipping and an EMA; resumes across world
    sizes in both directions: 1 process -> 2 FSDP ranks (each rank reads its rows of a one-process
    checkpoint) -> 1 process (reads the files the FSDP ranks gathered);
  - kill -9 of a 2-rank FSDP run after its first checkpoints: what `latest` names resumes in ONE
    process and ends where an uninterrupted run ends;
  - --fsdp refused with --lora, and without torchrun, by one `error:` line.

    python -m pytest -q tests/run/test_parallel.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from run import cli
import distill
from run import options
from run import training_state
from test_distill import (REPO, args_for, assert_adam_close, distill_cli, one_error, processes_writing, read_log,
                          tiny_argv, torchrun_distill, weights, world)  # noqa: F401  (world: a fixture)

FILES = ("student.safetensors", "fusion.safetensors", "student-ema.safetensors", "fusion-ema.safetensors")


def common_argv(world):
    """distillcfg with EMA: the MMDiT, its new guidance MLP (in FSDP's root unit), and the EMA of both;
    --clip-grad low enough to clip every step (the norm is then taken over every rank's shards); a W2SD
    teacher pair (sharded too under --fsdp-teachers)."""
    return ["--teacher", world["teacher"], "--data", world["data"], "--global-batch", "4", "--method", "distillcfg",
            "--ema", "0.9", "--lr", "1e-3", "--clip-grad", "0.05", "--no-progress", "--device", "cpu",
            "--ckpt-every", "1", "--keep", "4", "--teacher-sampler", "w2sd", "--weak", world["weak"]]


def test_fsdp_two_ranks_equal_one_process_and_resume_across_world_sizes(world, tmp_path):
    """Step 1 in one process, steps 2-3 under torchrun with 2 FSDP ranks x micro-batch 1 x 2 rounds (the
    teachers sharded too), step 4 in one process again, against 4 steps in one process with micro-batch 4."""
    common = common_argv(world)
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    distill.main(options.parse_args([*common, "--steps", "4", "--micro-batch", "4", "--out", str(one)]))
    distill.main(options.parse_args([*common, "--steps", "1", "--micro-batch", "2", "--out", str(mixed)]))
    torchrun_distill([*common, "--steps", "3", "--micro-batch", "1", "--out", str(mixed), "--resume", "--fsdp",
                      "--fsdp-teachers"])
    for step in (2, 3):  # the files the FSDP ranks gathered: the one-process format, the one-process numbers
        folder = f"checkpoints/step-{step:07d}"
        with open(mixed / folder / "state.json") as f:
            state = json.load(f)
        assert state["args"]["fsdp_teachers"] and state["replica_checksums"] is None
        a, b = weights(mixed / folder / "optimizer.safetensors"), weights(one / folder / "optimizer.safetensors")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert_adam_close(weights(mixed / folder / "student.safetensors"), weights(one / folder / "student.safetensors"),
                          lr=1e-3, steps=step)
    # the whole files of an FSDP run, as DDP's: the final student of step 3, loadable by one process
    assert sorted(f for f in os.listdir(mixed) if f.endswith(".safetensors")) == sorted(FILES)
    distill.main(options.parse_args([*common, "--steps", "4", "--micro-batch", "2", "--out", str(mixed), "--resume"]))
    for name in FILES:
        assert_adam_close(weights(mixed / name), weights(one / name), lr=1e-3, steps=4)
    la, lb = [r["loss"] for r in read_log(mixed)], [r["loss"] for r in read_log(one)]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=0)


def test_fsdp_kill_9_resumes_in_one_process(world, tmp_path):
    """SIGKILL torchrun's process group (2 FSDP ranks, a checkpoint every step) once two checkpoints exist:
    no worker survives, `latest` names a complete checkpoint, and one process resumes from it to two steps
    further, ending on the weights of one uninterrupted process."""
    out = tmp_path / "run"
    argv = tiny_argv(world, out, "--steps", "100000", "--ckpt-every", "1", "--fsdp", "--global-batch", "4",
                     "--micro-batch", "1", "--lr", "1e-3")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "distill.py", *argv], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and \
                len(training_state.complete_checkpoints(str(out / "checkpoints"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(out / cli.LOCK_NAME) as f:
        holder = json.load(f)  # rank 0's worker (a dying process may already show an empty command line)
    killed = time.time()
    while (processes_writing(out) or cli._alive(holder)) and time.time() < killed + 5:
        time.sleep(0.05)
    assert not processes_writing(out) and not cli._alive(holder)
    folder, state = training_state.resume_point(str(out))
    steps = state["step"] + 2
    resumed = distill.main(args_for(world, out, "--steps", str(steps), "--ckpt-every", "1", "--global-batch", "4",
                                    "--micro-batch", "4", "--lr", "1e-3", "--resume"))
    assert [r["step"] for r in read_log(out)] == list(range(1, steps + 1))
    ref = distill.main(args_for(world, tmp_path / "ref", "--steps", str(steps), "--global-batch", "4",
                                "--lr", "1e-3", "--ckpt-every", "1000"))
    assert_adam_close(weights(resumed), weights(ref), lr=1e-3, steps=steps)


REFUSED = {"lora": (["--fsdp", "--lora", "4"], "--lora"), "one-process": (["--fsdp"], "torchrun"),
           "teachers-alone": (["--fsdp-teachers"], "it needs --fsdp"),
           "teachers-main": (["--fsdp", "--fsdp-teachers", "--teacher-sampler", "w2sd", "--weak", "WEAK", "--w2sd-final",
                              "main"], "--w2sd-final main")}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fsdp_refusals(world, tmp_path, case):
    """One `error:` line naming the flag, exit status 2, before anything loads, and no --out (under torchrun's
    environment, but for the one-process case)."""
    out = tmp_path / "out"
    extra, words = REFUSED[case]
    extra = [world["weak"] if a == "WEAK" else a for a in extra]
    with pytest.MonkeyPatch.context() as mp:
        if case != "one-process":
            mp.setenv("RANK", "0")
            mp.setenv("WORLD_SIZE", "1")
        r = distill_cli(*tiny_argv(world, out, *extra))
    one_error(r, 2, "--fsdp", words)
    assert not out.exists()
