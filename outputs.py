"""The output rule: how every command that writes (train.py, eval.py, prepare.py, adapter_io.py) treats its
--out. One home, so that the rule is the same everywhere (docs/design.md, "run dirs and outputs"):

1. An existing output that the command did not write is refused without --overwrite (``check_output``).
2. No command writes over what it reads: an output is never an input file, nor inside an input dir, compared by
   real path and ``os.path.samefile`` (links and ``../`` resolved), side files included (``refuse_inputs``).
3. --overwrite (and pruning) replaces or removes only regular files that the command recognisably wrote; a
   directory or a link where one of its files should be makes the entry foreign (``is_regular_file``).
4. Temp files and dirs are created exclusively, never through a link (``write_atomically``, ``make_fresh_dir``).
5. Two writers of one output are refused by a lock (``OutputLock``, ``one_writer``).
6. No output goes into a run's checkpoint dir (``refuse_checkpoint``, checked by every lock before it is made).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile

import parallel


CKPT_NAME = re.compile(r"ckpt-(\d+)")  # a train.py checkpoint dir's name; the one pattern for it
TMP_NAME = re.compile(r"ckpt-\d+\.tmp")  # a checkpoint dir while save_checkpoint writes it


class OutputError(ValueError):
    pass


def is_regular_file(path: str) -> bool:
    """A regular file, not a link to one: the only kind of entry a command may replace or remove."""
    return os.path.isfile(path) and not os.path.islink(path)


def same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # why both: a hard link has its own path
    except OSError:
        return False


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, by real path."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def refuse_inputs(outputs: list[str], inputs: list[str]):
    """Rule 2: no output is an input file or inside an input dir."""
    for out in outputs:
        for src in inputs:
            if inside(out, src) if os.path.isdir(src) else same_file(out, src):
                raise OutputError(f"{out} would write over {src}, which this command reads: choose another --out")


def refuse_checkpoint(out: str):
    """Rule 6: no output in or below a checkpoint dir (it holds only what save_checkpoint wrote, or it is not
    one any more: resume and pruning would refuse it)."""
    for part in os.path.realpath(out).split(os.sep):
        if CKPT_NAME.fullmatch(part) or TMP_NAME.fullmatch(part):
            raise OutputError(f"--out {out} is inside the checkpoint {part}/: choose a dir outside it")


def check_output(path: str, overwrite: bool, ours, flag: str = "--overwrite"):
    """Rules 1 and 3 for one output file: absent, or (with ``overwrite``) a regular file that ``ours(path)`` says
    the command wrote."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputError(f"{path} exists: choose another --out, or {flag} replaces it")
    if not is_regular_file(path) or not ours(path):
        raise OutputError(f"{path} exists and was not written by this command (or not recognisably): nothing was "
                          "replaced; move it away by hand")


def write_atomically(path: str, data: bytes | str):
    """Write ``path`` whole or not at all: an exclusively created temp file beside it (a random name, never a
    link), flushed, then renamed over ``path`` (a link there is replaced, its target untouched)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")  # O_CREAT | O_EXCL | O_NOFOLLOW
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def make_fresh_dir(path: str):
    """Create ``path`` as a new dir: a link or anything else already there is refused, never followed."""
    try:
        os.mkdir(path)
    except FileExistsError:
        raise OutputError(f"{path} is in the way (a leftover or a link): move it away by hand") from None


class OutputLock:
    """An exclusive lock for one output: ``DIR/.lock`` for a dir, ``.NAME.lock`` beside a file. A second writer
    of the same output stops at once."""

    def __init__(self, out: str, is_dir: bool = True):
        refuse_checkpoint(out)  # why first: the lock file itself would be a foreign file in a checkpoint
        if is_dir:
            if os.path.lexists(out) and not os.path.isdir(out):
                raise OutputError(f"--out {out} is a file, not a directory")
            os.makedirs(out, exist_ok=True)
            lock = os.path.join(out, ".lock")
        else:
            folder, name = os.path.split(os.path.abspath(out))
            lock = os.path.join(folder, f".{name}.lock")
        try:  # why NOFOLLOW: a link planted as the lock file must not make us open (or create) its target
            self.file = os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644), "w")
        except OSError as e:
            raise OutputError(f"cannot lock {out}: {lock}: {e.strerror}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise OutputError(f"{out} is being written by another command (it holds {lock})") from None

    def release(self):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def one_writer(out: str, is_dir: bool = True):
    """``with one_writer(out):`` rank 0 holds ``OutputLock(out)`` for the block; if it cannot, every rank stops
    with its error."""
    held = []
    parallel.broadcast_outcome(lambda: held.append(OutputLock(out, is_dir)))  # runs on rank 0 only
    try:
        yield
    finally:
        for lock in held:
            lock.release()
