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

    python distill.py --w-min 9 --w-max 3
    error: --w-min 9 is larger than --w-max 3
"""

import argparse
import os
import sys
import traceback

TRACEBACK_ENV = "TEEFUSION_TRACEBACK"
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class InputError(ValueError):
    """Bad input that is not a ValueError by nature (exit status 2)."""


class Failure(RuntimeError):
    """A failure during the work whose message is already complete (exit status 1)."""


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


def one_line(error):
    """The message of an exception on one line (multi-line messages joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing key {error.args[0]!r}"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)


def exit_status(error):
    return 2 if isinstance(error, BAD_INPUT) else 1


def wants_traceback(args=None):
    return bool(getattr(args, "traceback", False)) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def run(main, parser, argv=None):
    """Parse argv with `parser`, call main(args), and turn an exception into one `error:` line
    and its exit status (see the module docstring). Returns main's result on success."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into exit statuses
        if wants_traceback(args):
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(e))
