"""
generate.py's output folder, and what a relaunch of the same command line trusts in it.

    OUT/images/PPPPP-KK.png   image K of prompt P, written atomically by exactly one rank
    OUT/index.rankR.jsonl     while a run goes on: rank R's finished images, one record per line, rewritten
                              (atomically) after each batch, AFTER its PNGs were renamed into place; each
                              record holds its PNG's size ("bytes")
    OUT/contact.png           at the end (rank 0): the contact sheet, then
    OUT/index.jsonl           every image's record in job order (prompt by prompt, seed by seed), as one
                              process writes it; the rank files are then removed

A relaunch (after a kill of one process or of the whole torchrun job, at any moment) trusts an image when
index.jsonl or a rank file records it and its file has the recorded size (`recorded`). A file that no
record lists (killed between its rename and the record) counts only if it holds this run's settings and
decodes to its last pixel (`read_image`); a truncated, empty or unreadable PNG is made again. Temporary
files of killed writes are removed (`remove_temporaries`), the records gathered into index.jsonl before
the work starts (`consolidate`). A relaunch of a finished run (`finished`) writes nothing.

    python -m pytest -q tests/run/test_relaunch.py -k generate
"""

import json
import os
import re

from PIL import Image

from sd3 import checkpoint
from sd3.checkpoint import atomic_write

INDEX = "index.jsonl"
SHEET = "contact.png"
RANK_FILE = re.compile(r"index\.rank(\d+)\.jsonl")
IMAGE = re.compile(r"\d{5}-\d{2,}\.png")


def rank_file(out, rank):
    return os.path.join(out, f"index.rank{rank}.jsonl")


def rank_files(out):
    """The rank files a run left in out (a killed run, or this one before its merge), sorted."""
    return sorted(os.path.join(out, n) for n in os.listdir(out) if RANK_FILE.fullmatch(n)) if os.path.isdir(out) else []


def index_text(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def write_records(path, records):
    """A JSON-lines file of records, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(index_text(records))

    atomic_write(path, write)


def read_records(path):
    """The records of a JSON-lines file (lines that do not parse as an object are left out); [] when absent."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("file"), str):
            records.append(r)
    return records


def recorded(out):
    """{file (relative to out): record} of index.jsonl and the rank files (the newer rank files win)."""
    found = {}
    for path in [os.path.join(out, INDEX)] + rank_files(out):
        found.update({r["file"]: r for r in read_records(path)})
    return found


def trusted(out, record):
    """Does the record's file exist with the size it records?"""
    path = os.path.join(out, record["file"])
    return isinstance(record.get("bytes"), int) and os.path.isfile(path) and os.path.getsize(path) == record["bytes"]


def read_image(path, size=None):
    """(generate.py's record of a PNG, None), after decoding every pixel; or (None, why) for a file that is
    truncated, empty, not an image, or (size: (width, height) in pixels) of another size, e.g. resized
    by an image viewer. Refuses a whole image without generate.py's record (not ours)."""
    try:
        with Image.open(path) as im:
            text = im.info.get("teefusion")
            im.load()  # every pixel: a truncated file fails here ("image file is truncated")
            found = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"
    if size is not None and tuple(found) != tuple(size):
        return None, f"{found[0]}x{found[1]} pixels, not the run's {size[0]}x{size[1]}"
    if text is None:
        raise ValueError(f"{path}: a PNG without generate.py's metadata; use another --out")
    return json.loads(text), None


def _owned(name):
    """The files generate.py writes in OUT and OUT/images (their temporaries are its own)."""
    return name in (INDEX, SHEET) or bool(RANK_FILE.fullmatch(name) or IMAGE.fullmatch(name))


def remove_temporaries(out):
    """Remove the temporary files killed writes of generate.py left in OUT and OUT/images (one line says so);
    only under OUT's lock (cli.FolderLock), when no other process writes there."""
    return [p for folder in (out, os.path.join(out, "images"))
            for p in checkpoint.remove_temporaries(folder, owned=_owned, quiet=True)]


def finished(out, records):
    """Is the run finished: index.jsonl holds exactly these records (all of the run's images, in job order),
    no rank file is left, and the contact sheet is there?"""
    try:
        with open(os.path.join(out, INDEX), encoding="utf-8") as f:
            same = f.read() == index_text(records)
    except (OSError, UnicodeDecodeError):
        return False
    return same and not rank_files(out) and os.path.isfile(os.path.join(out, SHEET))


def consolidate(out, records):
    """Before a run's work (rank 0, under the lock): the images already made (records, job order) into
    index.jsonl, then the rank files a killed run left are removed, so that this run's ranks start their
    own (a kill in between leaves both, which say the same). When index.jsonl changes, the contact sheet
    goes first: a contact sheet on disk is always that of the index.jsonl beside it (`merge` draws it
    before it writes the index), which is what lets `finished` trust it."""
    stale, index = rank_files(out), os.path.join(out, INDEX)
    if records != read_records(index) if os.path.isfile(index) else records:
        if os.path.isfile(os.path.join(out, SHEET)):
            os.remove(os.path.join(out, SHEET))
        write_records(index, records)
    for path in stale:
        os.remove(path)


def merge(out, records, sheet):
    """At the end (rank 0, after every rank finished): sheet(records) draws OUT/contact.png, then
    index.jsonl gets every record in job order, then the rank files are removed."""
    sheet(records)
    write_records(os.path.join(out, INDEX), records)
    for path in rank_files(out):
        os.remove(path)
