"""
What the checks a checkpoint goes through before and while it loads cost, next to the load itself,
on an MMDiT of SD3-medium's width (random weights, saved to a temporary folder):

    read_config     the header: every key and shape of the MMDiT it infers (what every command runs
                    on its checkpoints before any heavy work)
    check_values    every tensor read once, each checked finite (what `python mmdit.py` adds)
    load_mmdit      the load, every tensor checked finite as it is read
    all_finite      checkpoint.all_finite over the loaded tensors (one aminmax pass each), the check the
                    loaders run, beside torch.isfinite(t).all() (a bool copy of each tensor)

    python benchmarks/bench_input_checks.py                   # depth 2 (159 M parameters, 0.86 GB)
    python benchmarks/bench_input_checks.py --depth 4 --repeats 5
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level modules
from sd3 import checkpoint  # noqa: E402
from run import cli  # noqa: E402
import mmdit  # noqa: E402


def main(args):
    cli.at_least(args.depth, 1, "--depth")
    cli.at_least(args.repeats, 1, "--repeats")
    cli.at_least(args.threads, 1, "--threads")
    cfg = dataclasses.replace(mmdit.CONFIGS[args.config], depth=args.depth, dual_attention_layers=tuple(
        i for i in mmdit.CONFIGS[args.config].dual_attention_layers if i < args.depth))
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
    n = sum(t.numel() for t in (*model.parameters(), *model.buffers()))  # weights and the position table
    # the model, its file, the loaded copy and its state: four float32 copies at most
    cli.check_memory(4 * 4 * n, f"a {n / 1e6:.0f} M-number model, four times", "--depth")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mmdit.safetensors")
        mmdit.save_mmdit(mmdit.MMDiT(cfg), path)
        print(f"{args.config} at depth {args.depth}: {n / 1e6:.1f} M numbers, {os.path.getsize(path) / 1e9:.2f} GB "
              f"float32; torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
        print("| read_config ms | check_values s | load_mmdit s | all_finite s | isfinite().all() s |")
        print("|---|---|---|---|---|")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mmdit.read_config(path)
            t1 = time.perf_counter()
            mmdit.check_values(path)
            t2 = time.perf_counter()
            state = mmdit.load_mmdit(path).state_dict()
            t3 = time.perf_counter()
            assert all(checkpoint.all_finite(v) for v in state.values())
            t4 = time.perf_counter()
            assert all(bool(torch.isfinite(v).all()) for v in state.values())
            t5 = time.perf_counter()
            print(f"| {1000 * (t1 - t0):.0f} | {t2 - t1:.2f} | {t3 - t2:.2f} | {t4 - t3:.3f} | {t5 - t4:.3f} |")
            del state


if __name__ == "__main__":
    parser = cli.parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd3-medium", choices=sorted(mmdit.CONFIGS))
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    cli.run(main, parser)
