"""Run directories: what one holds, and the rules for starting, resuming and overwriting a run in one.

A run dir (``--out``) belongs to one run at a time (``outputs.OutputLock``: ``OUT/.lock``); outputs.py holds the
rule every command's output follows, this file what it means for a run dir. What train.py writes there,
and so all that ``--overwrite`` may ever remove:
    config.json     the run's settings (ours when it holds train.py's settings)
    metrics.jsonl   one JSON line per step
    latest          the name of the newest checkpoint
    ckpt-NNNNNN/    checkpoints, holding only checkpoint.CKPT_FILES (and ckpt-NNNNNN.tmp/ while one is written)
Anything else in the dir is the user's and is never touched. The rules (``plan_resume``, on rank 0, before
anything is loaded or written):
- a fresh start into a dir that holds a run needs ``--overwrite``, which removes only the entries above, and
  refuses (naming them) when one of them is not recognisably ours (a ckpt-7/ holding a thesis);
- ``--resume`` of a checkpoint of another dir (continuing another run into a new ``--out``) follows the
  same rule: the ``--out`` must hold no run, or ``--overwrite``;
- ``--resume`` of an older checkpoint of the same dir (a rewind) needs ``--overwrite``: the newer
  checkpoints and their metrics lines are what it replaces;
- a resume whose ``--steps`` is not past the checkpoint's step is refused: there is nothing to run;
- files are written atomically (temp file + rename), and nothing is trimmed before the run is sure to go on.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace

from adapter_io import resolve_adapter_dir
from checkpoint import checkpoint_step, is_checkpoint_like, is_valid_checkpoint, verify_checkpoint
from outputs import CKPT_NAME, TMP_NAME, OutputError, is_regular_file, write_atomically

RUN_FILES = ("config.json", "metrics.jsonl", "latest")


class RunDirError(OutputError):
    pass


# ----------------------------------------------------------------------------------------------------------
# What a run dir holds


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in a run dir, oldest first (by parsed step, not by name)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, d)) for d in os.listdir(out_dir) if (m := CKPT_NAME.fullmatch(d))]
    return sorted(found)


def prune(out_dir: str, keep: int, protect: set):
    """Delete all but the newest ``keep`` checkpoints; never one in ``protect`` nor the one ``latest`` names."""
    latest = os.path.join(out_dir, "latest")
    if os.path.isfile(latest):
        protect = protect | {open(latest, encoding="utf-8").read(64).strip()}
    for _, path in checkpoints(out_dir)[:-keep]:
        if os.path.basename(path) not in protect and is_ours(path):
            shutil.rmtree(path, ignore_errors=True)


def run_entries(out_dir: str) -> list[str]:
    """The names in ``out_dir`` that belong to a run (the list at the top), ours or not."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if n in RUN_FILES or CKPT_NAME.fullmatch(n) or TMP_NAME.fullmatch(n))


def is_ours(path: str) -> bool:
    """Whether a run entry is recognisably what train.py wrote (so --overwrite may remove it)."""
    name = os.path.basename(path)
    try:
        if CKPT_NAME.fullmatch(name) or TMP_NAME.fullmatch(name):
            return is_checkpoint_like(path)
        if not is_regular_file(path):  # a dir or a link where a run file should be is not ours
            return False
        if name == "latest":
            with open(path, encoding="utf-8") as f:
                return bool(CKPT_NAME.fullmatch(f.read(64).strip()))
        if name == "config.json":
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            return isinstance(cfg, dict) and {"num_experts", "lambda_cl", "world_size", "out"} <= cfg.keys()
        if name == "metrics.jsonl":
            with open(path, encoding="utf-8") as f:
                return all(isinstance(json.loads(line).get("step"), int) for line in f if line.strip())
    except (OSError, ValueError, AttributeError):
        return False
    return False


def clear_run(out_dir: str, entries: list[str]):
    """``--overwrite``: remove the run ``entries`` of ``out_dir``, all or (if one is not ours) none."""
    foreign = [n for n in entries if not is_ours(os.path.join(out_dir, n))]
    if foreign:
        raise RunDirError(f"--overwrite: {out_dir} holds {foreign}, which train.py did not write (or not "
                          "recognisably); nothing was removed: move them away by hand")
    for name in entries:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def trim_metrics(out_dir: str, step: int):
    """Keep only the metrics.jsonl lines of steps <= ``step`` (a resume re-logs the steps after it)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomically(path, "".join(keep))


def write_run_config(cfg, model_dir: str, world: int):
    """``OUT/config.json``: this run's resolved settings (the model dir, the world size), also printed."""
    resolved = {**asdict(cfg), "model": model_dir, "world_size": world}
    write_atomically(os.path.join(cfg.out, "config.json"), json.dumps(resolved, indent=2))
    print("config:", json.dumps(resolved))


def append_metrics(out: str, rec: dict):
    """One step's metrics as one line of ``OUT/metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Which checkpoint a run continues, and whether it may


def find_resume(path: str, log=print) -> str | None:
    """What ``--resume PATH`` continues: a checkpoint dir; or in a run dir the one ``latest`` names, else (latest
    missing, dangling or corrupted) the newest valid checkpoint, with a warning when it passes over a newer
    one; None for an empty or new dir (start fresh)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        try:  # why before anything of it is read: train_config.json and state.json are parsed next
            verify_checkpoint(path)
        except ValueError as e:
            raise RunDirError(f"--resume {path}: {e}") from None
        return path
    if os.path.isfile(path) and os.path.basename(path) == "latest":
        path = os.path.dirname(path) or "."
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--resume {path}: not a run dir or checkpoint dir")
    try:
        named = resolve_adapter_dir(path)
    except ValueError:
        named = None
    if named and named != path and is_valid_checkpoint(named):
        return named
    found = [p for _, p in checkpoints(path)]
    newest_valid = next((p for p in reversed(found) if is_valid_checkpoint(p)), None)  # hashes stop at the first
    if newest_valid:
        skipped = found[found.index(newest_valid) + 1:] + ([named] if named and named != path else [])
        if skipped:
            log(f"warning: --resume {path}: {sorted({os.path.basename(p) for p in skipped})} incomplete or "
                f"corrupted; continuing from {os.path.basename(newest_valid)}")
        return newest_valid
    if any(os.path.isfile(os.path.join(p, "state.pt")) for p in found + [path]):
        raise RunDirError(f"{path}: an old-format checkpoint (state.pt, a pickle); it is not read, since loading "
                          "a pickle can run code")
    if found:
        raise RunDirError(f"--resume {path}: no valid checkpoint among {[os.path.basename(p) for p in found]} "
                          "(incomplete or corrupted)")
    return None


def check_out_dir(cfg, ckpt: str | None, log, apply: bool = False):
    """May this run write into ``cfg.out``? The rules at the top. ``apply`` (``prepare_out_dir``, just before the
    run's first write): with ``--overwrite`` remove what they allow; nothing else, and nothing at all when one
    entry is not ours (checked before: ``clear_run`` refuses first)."""
    entries = run_entries(cfg.out)
    inside = ckpt is not None and os.path.realpath(os.path.dirname(os.path.abspath(ckpt))) == \
        os.path.realpath(cfg.out)
    if not inside:  # a fresh start, or another run's checkpoint continued here
        if entries and not cfg.overwrite:
            what = f"resuming {ckpt} into it would mix two runs: use an empty --out" if ckpt else \
                f"--resume {cfg.out} continues it"
            raise RunDirError(f"{cfg.out} holds an earlier run ({', '.join(entries)}): {what}, or --overwrite "
                              "starts over")
        foreign = [n for n in entries if not is_ours(os.path.join(cfg.out, n))]
        if foreign:
            clear_run(cfg.out, foreign)  # raises, naming them, and removes nothing
        if entries and apply:
            clear_run(cfg.out, entries)
        return
    config = os.path.join(cfg.out, "config.json")
    if os.path.exists(config) and not is_ours(config):
        raise RunDirError(f"{config} was not written by train.py: move it away to resume this run")
    step = checkpoint_step(ckpt)
    newer = [os.path.basename(p) for s, p in checkpoints(cfg.out) if s > step]
    if newer and not cfg.overwrite:
        raise RunDirError(f"--resume {ckpt} rewinds {cfg.out}: its newer checkpoints {newer} and their metrics "
                          "would be replaced; --overwrite allows it")
    if newer and apply:
        clear_run(cfg.out, newer)
        write_atomically(os.path.join(cfg.out, "latest"), os.path.basename(ckpt))
        log(f"--overwrite: removed {newer}, rewinding to {os.path.basename(ckpt)}")


def prepare_out_dir(cfg, ckpt: str | None, log):
    """Rank 0, once everything is loaded and the run is about to write: what ``--overwrite`` removes, removed."""
    check_out_dir(cfg, ckpt, log, apply=True)


def plan_resume(cfg, fixed_on_resume: tuple, log) -> str | None:
    """Rank 0, before anything is loaded: the checkpoint to resume (None = a fresh run), after checking that
    ``cfg.out`` may be used (``check_out_dir``), that there are steps left to run, and that the flags fit the
    checkpoint: those in ``fixed_on_resume`` must match it, any other that differs is applied and logged."""
    ckpt = find_resume(cfg.resume, log) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log(f"--resume {cfg.resume}: no checkpoint there yet, starting a fresh run")
    if ckpt is None:
        check_out_dir(cfg, None, log)
        return None
    step = checkpoint_step(ckpt)
    with open(os.path.join(ckpt, "train_config.json"), encoding="utf-8") as f:
        saved = upgrade_saved_config(json.load(f), ckpt, step)
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    try:  # the checkpoint's settings as a config of this run's type, so its properties say what it had on
        was = replace(cfg, **{k: v for k, v in saved.items() if k in now})
    except (TypeError, ValueError) as e:
        raise RunDirError(f"--resume {ckpt}: its train_config.json is not a valid config: {e}") from None
    fixed = {k: (saved.get(k), now[k]) for k in fixed_on_resume if saved.get(k) != now[k]}
    if was.uses_contrastive != cfg.uses_contrastive:
        fixed["contrastive loss on"] = (was.uses_contrastive, cfg.uses_contrastive)
    if fixed:
        raise RunDirError(f"--resume {ckpt}: these differ from the checkpoint (saved, now): {fixed}")
    if step >= cfg.steps:
        raise RunDirError(f"--resume {ckpt}: the checkpoint is at step {step} and --steps {cfg.steps} is the total, "
                          "so there is nothing to run (give a larger --steps)")
    check_out_dir(cfg, ckpt, log)
    for k in sorted(now.keys() - {"resume", "overwrite", "progress", "debug", "out"}):
        if k in saved and saved[k] != now[k]:
            log(f"resume: --{k.replace('_', '-')} {saved[k]} -> {now[k]} (applied)")
    return ckpt


REMOVED_AT = "62a67a4"  # the last commit with the removed readings and knobs (docs/results.md reproduces them there)


def upgrade_saved_config(saved, ckpt: str, step: int) -> dict:
    """A checkpoint's train_config.json in today's names: settings added since get the value the run had, and a
    checkpoint of a removed reading is refused. why: checkpoints written before a change still resume."""
    if not isinstance(saved, dict):
        raise RunDirError(f"--resume {ckpt}: its train_config.json is not a JSON object")
    saved = dict(saved)
    saved.setdefault("router", "token")  # before --router existed: token routers
    saved.setdefault("cl_debias", 0.0)  # before --cl-debias: plain InfoNCE (a resume logs the change)
    if "z_loss" in saved:  # renamed --lambda-z
        saved.setdefault("lambda_z", saved.pop("z_loss"))
    if isinstance(saved.get("queue"), bool):  # --queue --queue-size K became --queue K
        saved["queue"] = saved.get("queue_size", 1024) if saved["queue"] else 0
    contrastive = saved.get("lambda_cl", 0) and saved.get("num_experts", 1) > 1
    views = saved.get("cl_views", "sequence")
    if contrastive and views != "sequence":
        raise RunDirError(f"--resume {ckpt}: it was trained with the {views!r} contrastive reading, which was removed "
                          f"(it lost: docs/results.md); commit {REMOVED_AT} still resumes it")
    if step < saved.get("router_warmup", 0):
        raise RunDirError(f"--resume {ckpt}: it is inside its --router-warmup {saved['router_warmup']}, which was "
                          f"removed (docs/results.md); commit {REMOVED_AT} still resumes it")
    return saved
