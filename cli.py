"""
The command-line contract every script of this project keeps (DESIGN.md, "Contracts"):

    bad input (a wrong file, a missing key, an argument that cannot work)
        -> ONE line `error: <what is wrong, naming it>` on stderr, exit status 2
    a failure during the work (a non-finite loss, a worker that died, out of memory)
        -> ONE line `error: ...` on stderr, exit status 1
    a traceback only when asked for: `--traceback` on any command, or TEEFUSION_TRACEBACK=1

Scripts build their parser with `cli.parser(...)` (argparse whose own errors are one line too,
and which knows --traceback) and end with `cli.run(main, parser)`. Library code raises ordinary
exceptions with clear messages; this file decides how they reach the terminal:

    InputError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
    FileExistsError, PermissionError                                   -> bad input, exit 2
    anything else (RuntimeError, FloatingPointError, OSError, ...)     -> failure, exit 1
    SIGTERM (what torchrun sends the other workers when one fails)      -> exit 143, after the
        `finally` blocks ran (a half-written temporary file is removed, a lock released)

    python distill.py --w-min 9 --w-max 3
    error: --w-min 9 is larger than --w-max 3

The same contract covers how a command lives as a process:

  * Under torchrun, a worker dies with its launcher (die_with_launcher, armed by cli.run): a
    parent-death signal (Linux prctl PR_SET_PDEATHSIG, SIGKILL) and a watchdog thread that sees
    the parent pid change where prctl is not available. torchrun starts each worker in a session
    of its own, so `kill -9` of torchrun (or of its process group) would otherwise leave the
    workers running and writing.
  * One run per output folder (FolderLock): a lock file naming the holder's pid, host and
    command; a second run is refused with the holder's name; a lock whose process is gone
    (same host) is taken over with a warning.
"""

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

TRACEBACK_ENV = "TEEFUSION_TRACEBACK"
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
LOCK_NAME = "run.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class InputError(ValueError):
    """Bad input that is not a ValueError by nature (exit status 2)."""


class Failure(RuntimeError):
    """A failure during the work whose message is already complete (exit status 1)."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so `except Exception` lets it pass
    and every `finally` on the way out runs."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit 2) and a --traceback flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--traceback", action="store_true",
                          help=f"show the Python traceback of an error (or set {TRACEBACK_ENV}=1)")

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(description, **kwargs):
    return Parser(description=description, **kwargs)


def _worker_error(lines):
    """A DataLoader worker's exception comes back as "Caught ValueError in DataLoader worker process 0.",
    "Original Traceback (most recent call last):", the frames, then "ValueError: <message>": keep the
    message and say where it happened."""
    if len(lines) < 3 or not lines[0].startswith("Caught ") or not lines[1].startswith("Original Traceback"):
        return lines
    frames = [i for i, line in enumerate(lines) if line[:1].isspace()]
    message = lines[(frames[-1] + 1) if frames else 2:]
    if not message:
        return lines
    kind, _, first = message[0].partition(": ")
    message = [first or kind, *message[1:]]
    where = lines[0].split(" ", 2)[2].rstrip(".") if lines[0].count(" ") >= 2 else "in a worker"
    return [*message[:-1], f"{message[-1]} ({where})"]


def one_line(error):
    """The message of an exception on one line (multi-line messages joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1 and not str(error.args[0]).startswith("Caught "):
        text = f"missing key {error.args[0]!r}"
    parts = [p.strip() for p in _worker_error(text.splitlines()) if p.strip()]
    return "; ".join(parts)


def exit_status(error):
    return 2 if isinstance(error, BAD_INPUT) else 1


def wants_traceback(args=None):
    return bool(getattr(args, "traceback", False)) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def warn(message):
    """One `warning: ...` line on stderr: the command goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _terminated(signum, frame):
    raise Terminated("terminated (SIGTERM)")


def run(main, parser, argv=None):
    """Parse argv with `parser`, call main(args), and turn an exception into one `error:` line
    and its exit status (see the module docstring). Returns main's result on success. Under
    torchrun the process also dies with its launcher (die_with_launcher)."""
    args = parser.parse_args(argv)
    if under_launcher():
        die_with_launcher()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into exit statuses
        if wants_traceback(args):
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(e))


# -----------------------------------------------------------------------------
# A worker dies with its launcher


def under_launcher():
    """True in a worker started by torchrun (torch.distributed.run), which sets TORCHELASTIC_RUN_ID."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher(poll_s=0.5):
    """Kill this process (SIGKILL, as if it were killed with its launcher) as soon as its parent
    process dies: the kernel's parent-death signal where there is one (Linux), and in any case a
    daemon thread that polls the parent pid every poll_s seconds (an orphan is re-parented, so its
    parent pid changes). Returns the parent pid being watched."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still works
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    return parent


# -----------------------------------------------------------------------------
# Output folders: writable, and one run per folder


def output_folder(path, flag="--out"):
    """Make sure, before any heavy work, that `path` is a folder this process can write into:
    refuses a file, creates the folder (and its parents), writes and removes a probe file (the only
    test that also holds for root and for read-only mounts). Returns path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{flag} {path} is not writable ({e.strerror or e})") from e
    return path


def _process_start(pid):
    """The start time of a process in clock ticks since boot (Linux /proc), or None: with the pid,
    it tells a live holder from a new process that reuses a dead holder's pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has finished: no start time


def _alive(holder):
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    start = _process_start(pid)
    if os.path.exists("/proc/self/stat"):
        return start is not None and holder.get("process_start") in (None, start)
    return True


class FolderLock:
    """One run per output folder: FOLDER/run.lock holds {"pid", "host", "process_start", "started",
    "command"} of the run that holds it. Created whole in one step (the record is written to a
    temporary file, then hard-linked to the lock's name, which fails if a lock exists), released at
    exit. A second run is refused (InputError, naming the holder); a lock whose process is gone
    (same host: no such pid, a zombie, or the pid reused by a newer process) is taken over with a
    warning. A holder on another host cannot be checked: the lock stands until it is released or
    deleted by hand.

        with FolderLock(out, "--out"):
            ...  # the run
    """

    def __init__(self, folder, flag="the folder"):
        self.folder, self.flag = folder, flag
        self.path = os.path.join(folder, LOCK_NAME)
        self.record, self.created = None, False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _mine(self):
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}

    def _create(self, record):
        """Create the lock file holding `record`; False if a lock file exists."""
        tmp = f"{self.path}.new-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise InputError(f"{self.flag} {self.folder} is not writable ({e.strerror or e})") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _read(self, path=None):
        try:
            with open(path or self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def describe(self, holder):
        return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}, "
                f"running: {holder.get('command')}")

    def acquire(self):
        self.created = not os.path.exists(self.folder)
        output_folder(self.folder, self.flag)
        record = self._mine()
        for _ in range(10):
            if self._create(record):
                self.record = record
                return self
            text = self._read()
            if text is None:
                continue  # released in the meantime
            try:
                holder = json.loads(text)
            except ValueError:
                holder = None
            if not isinstance(holder, dict):
                raise InputError(f"{self.flag} {self.folder} has a lock file it cannot read ({self.path}): if no "
                                 "run is using the folder, delete that file")
            if holder.get("host") != record["host"]:
                raise InputError(f"{self.flag} {self.folder} is in use by another run ({self.describe(holder)}; lock "
                                 f"file {self.path}): wait for it to end or choose another {self.flag}; if that run "
                                 "is gone, delete the lock file")
            if _alive(holder):
                raise InputError(f"{self.flag} {self.folder} is in use by another run ({self.describe(holder)}): "
                                 f"wait for it to end, or choose another {self.flag}")
            self._take_over(text, holder)
        raise InputError(f"{self.flag} {self.folder}: could not take {self.path} (other runs are starting on it)")

    def _take_over(self, text, holder):
        """Move the stale lock aside under a name of our own; if what was moved is not the stale
        lock that was judged (another run took it over first), put it back."""
        moved = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if self._read(moved) == text:
            warn(f"{self.flag} {self.folder}: taking over the lock of a run that is gone ({self.describe(holder)})")
        else:
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        os.remove(moved)

    def release(self):
        """Remove the lock file if it is still this process's, and the folder if acquire created it
        and nothing was written into it (a run refused after taking the lock leaves no trace)."""
        if self.record is None:
            return
        try:
            holder = json.loads(self._read() or "{}")
            if (holder.get("pid"), holder.get("host")) == (self.record["pid"], self.record["host"]):
                os.remove(self.path)
            if self.created and not os.listdir(self.folder):
                os.rmdir(self.folder)
        except (OSError, ValueError, AttributeError):
            pass
        self.record = None
