"""run/cli.py: one `error:` line, exit status 2 for bad input and 1 for a failure during the work,
a traceback only when asked for."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from run import cli


def run_script(tmp_path, body, *argv, env=None):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(cli.__file__))!r})
        from run import cli
        def main(args):
        {textwrap.indent(textwrap.dedent(body), '    ')}
        p = cli.parser("test script")
        p.add_argument("--n", type=int, default=1)
        cli.run(main, p)
    """))
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("body, status, message", [
    ("raise ValueError('--w-min 9 is larger than --w-max 3')", 2, "error: --w-min 9 is larger than --w-max 3"),
    ("raise FileNotFoundError('--teacher x.safetensors: no such file')", 2, "error: --teacher x.safetensors"),
    ("raise cli.InputError('two lines\\nof message')", 2, "error: two lines; of message"),
    ("raise FloatingPointError('non-finite loss (nan) at step 2')", 1, "error: non-finite loss (nan) at step 2"),
    ("raise RuntimeError('worker died')", 1, "error: worker died"),
])
def test_one_line_and_exit_status(tmp_path, body, status, message):
    r = run_script(tmp_path, body)
    assert r.returncode == status
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_traceback_when_asked(tmp_path):
    r = run_script(tmp_path, "raise ValueError('bad')", "--traceback")
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().endswith("error: bad")
    r = run_script(tmp_path, "raise ValueError('bad')", env={cli.TRACEBACK_ENV: "1"})
    assert "Traceback" in r.stderr


def test_argparse_errors_are_one_line(tmp_path):
    r = run_script(tmp_path, "return 0", "--n", "two")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: argument --n")


def test_success_returns_zero(tmp_path):
    r = run_script(tmp_path, "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok" and r.stderr == ""


def test_an_error_in_a_dataloader_worker_keeps_its_message():
    """A DataLoader worker's exception reaches the main process with its whole traceback in the message
    (torch's ExceptionWrapper, as the DataLoader uses it): the one line keeps the message and says where
    it happened. (tests/test_distill.py sees it through a real worker.)"""
    from torch._utils import ExceptionWrapper

    try:
        raise ValueError("/data/shard-00003.safetensors is a corrupt shard")
    except ValueError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value)
    assert cli.one_line(caught.value) == "/data/shard-00003.safetensors is a corrupt shard (in DataLoader worker " \
                                         "process 0)"


def test_sigterm_runs_finally_blocks_and_exits_143(tmp_path):
    """torchrun stops the other workers with SIGTERM when one fails: the `finally` blocks run (a
    temporary file is removed, a lock released), then one line and 128 + 15."""
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(cli.__file__))!r})
        from run import cli
        def main(args):
            open({str(started)!r}, "w").close()
            try:
                time.sleep(60)
            finally:
                open({str(cleaned)!r}, "w").close()
        cli.run(main, cli.parser("sleeps"))
    """)], stderr=subprocess.PIPE, text=True)
    wait_for(started.exists)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and stderr.strip() == "error: terminated (SIGTERM)" and cleaned.exists()


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.02)


def alive(pid):
    """A process that exists and is not a zombie (an orphan's zombie waits for its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("prctl", [True, False])
def test_a_worker_dies_with_its_launcher(tmp_path, prctl):
    """A launcher starts a worker in a session of its own (as torchrun does) and is killed with SIGKILL:
    the worker dies within a second, by the parent-death signal or, without prctl, by the watchdog."""
    pid_file = tmp_path / "worker.pid"
    worker = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(cli.__file__))!r})
        from run import cli
        if not {prctl}:
            cli.ctypes = None  # no prctl here: only the watchdog thread
        cli.die_with_launcher(poll_s=0.1)
        with open({str(pid_file)!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(60)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                                 f"[sys.executable, '-c', {worker!r}], start_new_session=True); time.sleep(60)"],
                                start_new_session=True)
    try:
        wait_for(pid_file.exists)
        pid = int(pid_file.read_text())
        assert alive(pid)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    killed = time.time()
    try:
        wait_for(lambda: not alive(pid), timeout=5)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    print(f"worker gone {time.time() - killed:.2f} s after its launcher")


def test_output_folder_refuses_a_file_and_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(cli.InputError, match=r"--out .*file is a file, not a folder"):
        cli.output_folder(str(tmp_path / "file"))
    with pytest.raises(cli.InputError, match=r"--out .*file/sub is not writable \(Not a directory\)"):
        cli.output_folder(str(tmp_path / "file" / "sub"))
    assert cli.output_folder(str(tmp_path / "a" / "b")) and os.listdir(tmp_path / "a" / "b") == []


def lock_record(**changes):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": cli._process_start(os.getpid()),
              "started": "2026-11-22 09:00:00", "command": "distill.py --out run"}
    return json.dumps({**record, **changes})


def test_folder_lock_one_run_per_folder(tmp_path, capsys):
    """Taken and released; a live holder refuses (naming pid and host), as does a holder on another
    host or an unreadable lock; a holder that is gone (no such pid, or the pid reused by a newer
    process) is taken over with a warning; the folder the lock created is removed if left empty."""
    folder = tmp_path / "run"
    with cli.FolderLock(str(folder), "--out") as lock:
        held = json.loads((folder / cli.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(cli.InputError, match=rf"--out .*run is in use by another run \(pid {os.getpid()} on "
                                                 rf"host {socket.gethostname()}"):
            cli.FolderLock(str(folder), "--out").acquire()
        assert lock.record is not None
    assert not folder.exists()  # created by the lock, left empty: removed

    folder.mkdir()
    path = folder / cli.LOCK_NAME
    path.write_text(lock_record(host="another-host"))
    with pytest.raises(cli.InputError, match="in use by another run .*another-host.*delete the lock file"):
        cli.FolderLock(str(folder)).acquire()
    for broken in ("{", b"\xff\xfe", "folder"):  # bad JSON, no UTF-8, a folder where the lock file belongs
        if broken == "folder":
            path.unlink()
            path.mkdir()
        elif isinstance(broken, bytes):
            path.write_bytes(broken)
        else:
            path.write_text(broken)
        with pytest.raises(cli.InputError, match="lock file it cannot read"):
            cli.FolderLock(str(folder)).acquire()
    path.rmdir()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for stale in (lock_record(pid=gone.pid), lock_record(process_start=1)):  # dead pid; pid reused
        path.write_text(stale)
        capsys.readouterr()
        lock = cli.FolderLock(str(folder), "--out").acquire()
        assert capsys.readouterr().err.startswith(f"warning: --out {folder}: taking over the lock of a run that is "
                                                  f"gone (pid {json.loads(stale)['pid']}")
        assert json.loads(path.read_text())["process_start"] == cli._process_start(os.getpid())
        lock.release()
        assert not path.exists() and folder.exists()  # the folder was there before: it stays
    assert os.listdir(folder) == []
