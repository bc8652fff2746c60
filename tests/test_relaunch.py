"""
The relaunch rule (relaunch.py, final_files.py, image_folder.py; the test hook of checkpoint.py): every
command that writes files, killed with SIGKILL AT A CHOSEN WRITE (TEEFUSION_KILL_AT_WRITE, after the
temporary file is filled and before it is renamed) and launched again with the same argv until it exits
0, leaves what an uninterrupted run leaves: the same bytes, or for a safetensors file the same tensors
bit for bit and the same metadata (`same_file`), the measured seconds of PNGs and reports aside; relaunched once finished, it says so, exits 0 and changes nothing; the
temporary files a kill left are removed. Also: truncated and empty PNGs are made again; generate.py and
evaluate.py table4 under torchrun (2 gloo ranks) make the same images, index and scores as one process.

    python -m pytest -q tests/test_relaunch.py
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import checkpoint
import relaunch
from test_distill import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(argv, kill=None, timeout=240):
    """Run argv (in the repository, one thread, in a session of its own: a timeout kills it whole) with
    TEEFUSION_KILL_AT_WRITE set to `kill`; it must die by SIGKILL when kill is given (the chosen write
    happened), else exit 0. Returns (stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != checkpoint.KILL_AT_WRITE}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **({checkpoint.KILL_AT_WRITE: kill} if kill else {}))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == (-signal.SIGKILL if kill else 0), (kill, proc.returncode, out[-3000:], err[-3000:])
    return out, err


def lives(argv, kills, timeout=240):
    """The same argv launched once per entry of kills, killed at that write, then once more to the end:
    [(stdout, stderr)] of every launch."""
    return [launch(argv, kill, timeout) for kill in [*kills, None]]


def temporaries(out):
    return checkpoint.temporaries(str(out), recursive=True)


def same_file(a, b):
    """The same file, byte for byte; a safetensors file: the same tensors bit for bit and the same metadata
    (safetensors' writer orders the metadata in its header differently in each process, so two processes
    never write the same bytes)."""
    if not str(a).endswith(".safetensors"):
        return open(a, "rb").read() == open(b, "rb").read()
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys()) and all(
            torch.equal(fa.get_tensor(k), fb.get_tensor(k)) and fa.get_tensor(k).dtype == fb.get_tensor(k).dtype
            for k in fa.keys())


def sizes(record):
    """final.json's parts, each file with its size (the SHA-256 differs where the metadata order does)."""
    return {part: {f: r["size"] for f, r in files.items()} for part, files in record["parts"].items()}


# -----------------------------------------------------------------------------
# The test hook, and the record


def test_the_hook_kills_at_the_chosen_write_and_the_old_file_survives(tmp_path):
    """TEEFUSION_KILL_AT_WRITE="2:a.json": killed at the second write of a.json (the writes of b.json do not
    count), before the rename: a.json holds the first write, its temporary is left, and removing the
    temporaries of a.json (owned) leaves b.json's alone."""
    code = ("import sys, checkpoint\n"
            "for i in range(3):\n"
            "    checkpoint.atomic_json({'i': i}, sys.argv[1] + '/b.json')\n"
            "    checkpoint.atomic_json({'i': i}, sys.argv[1] + '/a.json')\n")
    launch([sys.executable, "-c", code, str(tmp_path)], "2:a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"i": 0}
    assert json.loads((tmp_path / "b.json").read_text()) == {"i": 1}
    left = checkpoint.temporaries(str(tmp_path))
    assert len(left) == 1 and os.path.basename(left[0]).startswith("a.json.tmp-")
    (tmp_path / "b.json.tmp-zz1").write_text("{")
    assert checkpoint.remove_temporaries(str(tmp_path), owned=lambda n: n == "a.json") == left
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json", "b.json.tmp-zz1"]


def test_a_record_trusts_only_intact_files_of_the_same_inputs(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"

    def put(path, data):
        path.write_bytes(data)
        return [str(path)]

    record = relaunch.Record(str(tmp_path), "done.json", {"of": 1})
    assert record.write("one", lambda: put(a, b"x" * 10)) is True
    assert record.write("one", lambda: pytest.fail("written twice")) is False
    record.write("two", lambda: put(b, b"y" * 10))
    on_disk = json.loads((tmp_path / "done.json").read_text())
    assert on_disk == {"of": {"of": 1}, "parts": {"one": {"a.bin": {"size": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()}},
                                                  "two": {"b.bin": {"size": 10, "sha256": hashlib.sha256(b"y" * 10).hexdigest()}}}}
    assert relaunch.Record(str(tmp_path), "done.json", {"of": 1}).finished(["one", "two"])
    assert not relaunch.Record(str(tmp_path), "done.json", {"of": 2}).finished(["one"])  # other inputs: nothing
    b.write_bytes(b"z" * 10)  # the same size, other bytes
    again = relaunch.Record(str(tmp_path), "done.json", {"of": 1})
    assert again.done("one") and not again.done("two") and not again.finished(["one", "two"])
    a.unlink()
    assert not relaunch.Record(str(tmp_path), "done.json", {"of": 1}).done("one")
