"""cli.py: one `error:` line, exit status 2 for bad input and 1 for a failure during the work,
a traceback only when asked for."""

import os
import subprocess
import sys
import textwrap

import pytest

import cli


def run_script(tmp_path, body, *argv, env=None):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(cli.__file__)!r})
        import cli
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
