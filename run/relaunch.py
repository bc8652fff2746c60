"""
The relaunch rule of every command that writes files: the same command line, launched again after a
kill at any moment (a batch system's retry, torchrun's elastic restart, a person re-running a script),
finishes the job; launched again after the job finished, it says so, exits 0 and writes nothing.

  * Every file is written atomically (checkpoint.atomic_write): a kill leaves whole files, and at most
    NAME.tmp-XXXX temporaries, which the relaunch removes from the files it owns and names in one line
    (checkpoint.remove_temporaries).
  * What a command has finished is RECORDED once its files are in place, and a record is trusted only
    while every file it lists is there with the size and SHA-256 it lists (`Record`): the relaunch
    writes the parts that are not recorded, or whose files do not match, and nothing else.

A record is one JSON file in the output folder (distill.py's DIR/final.json):

    {"of": what the files are a function of (distill.py: the checkpoint at --steps),
     "parts": {part: {file, relative to the folder: {"size": bytes, "sha256": hex digest}}}}

rewritten atomically after each part; a record of another "of" counts for nothing (its files are
written again). Reading a record back hashes the files it lists (seconds per GB: docs/RELAUNCH.md),
which is what it costs to be sure that a file is the one that was written.

    python -m pytest -q tests/run/test_relaunch.py
"""

import hashlib
import json
import os

from sd3.checkpoint import atomic_json


def digest(path):
    """{"size": bytes, "sha256": hex} of a file."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": sha}


def mismatch(path, recorded):
    """Why a file is not the one `recorded` ({"size", "sha256"}) describes, or None when it is."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    if os.path.getsize(path) != recorded.get("size"):
        return f"{path} has {os.path.getsize(path)} bytes, not the {recorded.get('size')} recorded"
    if digest(path)["sha256"] != recorded.get("sha256"):
        return f"{path} is not the file that was recorded (another SHA-256)"
    return None


class Record:
    """The parts of a job that are finished, in folder/name (module docstring). `of`: a JSON-able
    value naming what the files are a function of; a record on disk for another `of` is ignored.

        record = Record(out, "final.json", {"checkpoint": "step-0001000", ...})
        record.write("student", lambda: [save(...)])   # skipped when recorded and intact
        record.finished(["student", "report"])          # every part recorded and intact
    """

    def __init__(self, folder, name, of):
        self.folder, self.path, self.of = folder, os.path.join(folder, name), of
        self.parts, self._intact = {}, set()
        try:
            with open(self.path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):  # none yet, or unreadable: nothing is trusted
            old = None
        if isinstance(old, dict) and old.get("of") == json.loads(json.dumps(of)) and isinstance(old.get("parts"), dict):
            self.parts = old["parts"]

    def done(self, part):
        """Is the part recorded, with every file it lists there and the same (size, SHA-256)?"""
        if part not in self._intact:
            files = self.parts.get(part)
            if not isinstance(files, dict) or not files or any(
                    not isinstance(rec, dict) or mismatch(os.path.join(self.folder, rel), rec) for rel, rec in files.items()):
                return False
            self._intact.add(part)
        return True

    def finished(self, parts):
        return all(self.done(p) for p in parts)

    def write(self, part, write):
        """Unless `part` is done: write() (which writes its files, each atomically, and returns their
        paths), then record them. Returns True when it wrote."""
        if self.done(part):
            return False
        paths = write()
        self.parts[part] = {os.path.relpath(p, self.folder): digest(p) for p in paths}
        self._intact.add(part)
        atomic_json({"of": self.of, "parts": self.parts}, self.path)
        return True
