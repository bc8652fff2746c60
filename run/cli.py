"""
The command-line contract every script of this project keeps (docs/RELIABILITY.md has what each command checks):

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

Every command checks its inputs, by class, with the shared checks of this file, before anything
heavy loads (each refusal is one `error:` line naming the flag or file, exit status 2):

    numbers       finite, in range, the bound and its reason in the message     finite, at_least
    seeds         every seed a command derives fits torch's generator (uint64)    check_seed
    devices       --device names a device this torch has (cpu, cuda[:N], mps)     check_device
    memory        an allocation's size against the memory there is (RAM, cgroup  check_memory
                  limit, or the GPU's free memory), before allocating
    outputs       a file name (not a folder, the right suffix, a writable folder), output_file,
                  never one of the command's inputs                               not_an_input
    files read    JSON syntax, text that is not UTF-8, a zip/npz that is not one, reading, read_json,
                  a missing key: named with the file (and line)                   read_text
    results       JSON printed or written holds finite numbers only               json_text
"""

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import zipfile

TRACEBACK_ENV = "TEEFUSION_TRACEBACK"
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
LOCK_NAME = "run.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class InputError(ValueError):
    """Bad input that is not a ValueError by nature (exit status 2)."""


class MissingKey(InputError, KeyError):
    """A file lacks a key it must have (exit status 2). A KeyError for Python callers; its message is
    printed as written (a plain KeyError prints the repr of its key)."""

    __str__ = BaseException.__str__


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
    if isinstance(error, KeyError) and not isinstance(error, InputError) and len(error.args) == 1 \
            and not str(error.args[0]).startswith("Caught "):
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


def folder_path(path, flag, what=""):
    """A path given for a folder, before anything looks inside it: not empty, not a link to nothing (or a
    loop of links), not a file. what: how the command calls the folder, added to each message."""
    if not path:
        raise InputError(f"{flag} '': give a folder{what}")
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{flag} {path} is a symbolic link to nothing (or a loop of links), not a folder{what}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder{what}")
    return path


def output_folder(path, flag="--out", create=True):
    """Make sure, before any heavy work, that `path` is a folder this process can write into:
    refuses a file, creates the folder (and its parents), writes and removes a probe file (the only
    test that also holds for root and for read-only mounts). create=False: nothing is created, the
    probe goes into the nearest folder that exists (the one the folder would be created in). Returns path."""
    folder_path(path, flag)
    where = os.path.abspath(path)
    while not create and not os.path.exists(where):
        where = os.path.dirname(where)
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(where):
            raise NotADirectoryError(20, "Not a directory")
        fd, probe = tempfile.mkstemp(dir=where, prefix=".write-probe-")
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
        """The lock file's text; None once it is gone; "" when it cannot be read (a folder, bytes that are
        no UTF-8, no permission): acquire then names it as a lock file it cannot read."""
        try:
            with open(path or self.path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return ""

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


# -----------------------------------------------------------------------------
# Checking inputs before the work: one check per class of careless input


def _bound(low, high, low_open):
    parts = ([f"> {low:g}" if low_open else f">= {low:g}"] if low is not None else []) + \
            ([f"<= {high:g}"] if high is not None else [])
    return " and ".join(parts)


def finite(value, flag, low=None, high=None, low_open=False, why=""):
    """A float flag: finite (no NaN or inf) and within [low, high] ((low, high] with low_open). The
    message names the flag, the bound and, when given, why the bound holds. Returns value."""
    ok = value is not None and math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or value <= high)
    if not ok:
        bound = _bound(low, high, low_open)
        shown = "(none)" if value is None else format(value, "g")
        raise InputError(f"{flag} {shown}: must be {bound + ', ' if bound else ''}a finite number"
                         + (f" ({why})" if why else ""))
    return value


def at_least(value, low, flag, high=None, why=""):
    """An integer flag >= low (and <= high when given), with the reason in the message. Returns value."""
    if value is None or value < low or (high is not None and value > high):
        raise InputError(f"{flag} {value}: must be {_bound(low, high, False)}" + (f" ({why})" if why else ""))
    return value


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def check_seed(seed, flag="--seed", largest=None, how="", remedy=None):
    """A seed >= 0 whose largest derived seed (`largest`, e.g. seed + k for image k; default seed
    itself) still fits torch's generator (2**64 - 1), so that a run never fails halfway through."""
    if seed < 0:
        raise InputError(f"{flag} {seed}: must be >= 0")
    largest = seed if largest is None else largest
    if largest > SEED_MAX:
        raise InputError(f"{flag} {seed}: {how or 'the largest seed it gives'} = {largest} is beyond the largest "
                         f"seed torch's generator takes (2**64 - 1 = {SEED_MAX}); {remedy or 'use a smaller ' + flag}")
    return seed


def check_device(spec, flag="--device"):
    """--device as a torch.device, refused (naming the flag) when torch does not know the name, when
    this torch has no such GPU (a CPU-only build, no driver, an index beyond the GPUs there are), or
    when it is no device this project runs on (cpu, cuda[:N], mps). None stays None (the default)."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {spec!r}: not a device name torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise InputError(f"{flag} {spec}: this torch ({torch.__version__}, {built}) sees no CUDA GPU; "
                             f"use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {spec}: there are {torch.cuda.device_count()} CUDA GPU(s) here, "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{flag} {spec}: this torch sees no MPS (Apple GPU) device; use {flag} cpu")
    elif device.type != "cpu":
        raise InputError(f"{flag} {spec}: this project runs on cpu, cuda or mps, not {device.type}")
    return device


def _meminfo():
    """/proc/meminfo in bytes (Linux), or {}."""
    try:
        with open("/proc/meminfo") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.split()}
    except (OSError, ValueError):
        return {}


def _cgroup_headroom():
    """Bytes this process's cgroup (v2) may still allocate under its memory.max, or None."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.strip().split(":", 2)[2] for line in f if line.startswith("0::"))
        folder = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(folder, "memory.current")) as f:
            current = int(f.read())
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)


def available_memory(device="cpu"):
    """(bytes that can still be allocated, where that number comes from) on a device: a GPU's free
    memory (torch.cuda.mem_get_info); for the CPU the kernel's MemAvailable plus free swap, or less
    under a cgroup memory limit; (None, ...) where it cannot be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    info = _meminfo()
    if "MemAvailable" in info:
        free, source = info["MemAvailable"] + info.get("SwapFree", 0), "available RAM + free swap"
    else:
        try:
            free, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    headroom = _cgroup_headroom()
    if headroom is not None and headroom < free:
        free, source = headroom, "this process's cgroup memory limit"
    return free, source


def gb(nbytes):
    """Bytes for a message: MB, GB or TB."""
    if nbytes >= 1e12:
        return f"{nbytes / 1e12:,.3g} TB" if nbytes < 1e15 else f"{nbytes / 1e12:,.0f} TB"
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def check_memory(nbytes, what, flags, device="cpu"):
    """Refuse, before allocating, work whose memory (`nbytes`, an estimate that does not exceed what
    the work allocates: `what` says of what) is more than the device has free. flags: the flags that
    set the size. Where free memory cannot be read, nothing is refused."""
    free, source = available_memory(device)
    if free is not None and nbytes > free:
        raise InputError(f"{flags}: {what} needs at least {gb(nbytes)}, more than the {gb(free)} there is "
                         f"({source}); lower {flags}")
    return nbytes


def same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def not_an_input(outputs, inputs):
    """Refuse an output that is one of the command's inputs, by any name (a symbolic or hard link, a
    relative path): outputs and inputs are (flag, path) pairs, the paths of the files (or folders)
    the command writes and reads. Outputs never replace inputs, nor go inside an input folder (a model's
    folder: `--out clip/config.json` would replace the CLIP model's config)."""
    for out_flag, out in outputs:
        for in_flag, path in inputs:
            if out and path and os.path.exists(path) and same_file(out, path):
                raise InputError(f"{out_flag} {out} is {in_flag} {path}, an input of this command: writing it would "
                                 f"replace what it reads; choose another {out_flag.split()[-1]}")
            if out and path and os.path.isdir(path) and inside(out, path):
                raise InputError(f"{out_flag} {out} is inside {in_flag} {path}, an input folder of this command: "
                                 f"writing there could replace what it reads; choose another {out_flag.split()[-1]}")


def inside(path, folder):
    """Is path (existing or not) strictly inside folder, by real paths (links resolved)?"""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def output_file(path, flag="--out", suffixes=None, inputs=(), create=False):
    """Make sure, before any heavy work, that `path` can be written as a file: a name (not empty, not
    ending in a separator, not an existing folder), with one of `suffixes` when given (what the file
    is written as), in a folder this process can write into (create: made now; else left to the
    writer, checkpoint.atomic_write, so that a refused run leaves no folder behind), and none of the
    command's `inputs` ((flag, path) pairs). Returns path."""
    if not path or path.endswith((os.sep, "/")) or os.path.basename(path) in ("", ".", ".."):
        raise InputError(f"{flag} {path!r}: not a file name (a folder?); give a file name"
                         + (f" ending in {' or '.join(suffixes)}" if suffixes else ""))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder: give a file name"
                         + (f" ending in {' or '.join(suffixes)}" if suffixes else ""))
    if suffixes and not path.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise InputError(f"{flag} {path}: the file is written as {' or '.join(suffixes)}; give a name that ends so")
    not_an_input([(flag, path)], inputs)
    output_folder(os.path.dirname(os.path.abspath(path)), f"the folder of {flag}", create=create)
    return path


@contextlib.contextmanager
def reading(path, what=None):
    """Errors met while reading the file `path` become one InputError that names it (`what`: how the
    command calls it, e.g. "--prompts p.json"): JSON syntax (with line and column), text that is not
    UTF-8, a zip / .npz that is not one (truncated, or another format), a missing key."""
    name = what or path
    try:
        yield
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as "
                         "UTF-8") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{name}: not a readable zip / .npz file (truncated, or another format: {e})") from None
    except InputError:
        raise
    except KeyError as e:
        raise InputError(f"{name}: missing key {e.args[0]!r}" if len(e.args) == 1 else f"{name}: {e}") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a folder, not a file") from None


def regular_file(path, what=None):
    """Refuse, before it is opened, a path that is there but is neither a regular file nor a folder: a FIFO
    (its read would wait forever for a writer), a socket or a device (/dev/zero never ends). Returns path."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise InputError(f"{what or path}: not a regular file (a FIFO, socket or device), which cannot be read as "
                         "one; give the file itself")
    return path


def read_text(path, what=None):
    """The text of a UTF-8 file, errors named (`reading`)."""
    regular_file(path, what)
    with reading(path, what), open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path, what=None):
    """The JSON value of a file, errors named with the file, line and column (`reading`)."""
    regular_file(path, what)
    with reading(path, what), open(path, encoding="utf-8") as f:
        return json.load(f)


def _non_finite(obj, where="result"):
    """The places (dotted) of the non-finite floats in a JSON-like value."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{where} = {obj}"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def json_text(obj, what="the result", **kwargs):
    """json.dumps(obj) for a result that is printed or written: a non-finite number (NaN, inf) is not a
    result, and not JSON either, so it is a failure (exit status 1) naming where it is."""
    bad = _non_finite(obj, "")
    if bad:
        raise Failure(f"{what} holds non-finite numbers ({', '.join(p.lstrip('.') for p in bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}): not written")
    return json.dumps(obj, allow_nan=False, **kwargs)
