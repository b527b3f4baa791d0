"""Run directories: what a resume continues, and never losing what train.py did not write: each case stops
with one line (exit 2 from the command line) and leaves every file byte-identical, or works as a user would
expect; nothing non-finite is saved or applied; no pickle is ever read."""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, small_cfg, tree


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Two finished 6-step runs: A (seed 7) and B (seed 0), checkpoints every 3 steps, 3 kept."""
    from train import train

    base = tmp_path_factory.mktemp("runs")
    train(small_cfg(tiny_dir, base / "A", seed=7, keep=3))
    train(small_cfg(tiny_dir, base / "B", keep=3))
    return base


def copy(runs, tmp_path, name):
    import shutil

    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def test_resuming_another_run_into_a_dir_holding_a_run_is_refused(tiny_dir, runs, tmp_path):
    """--resume A --out B, B holding a run: refused, B untouched; into an empty --out it continues A there."""
    from run_dir import RunDirError
    from train import train

    a, b = copy(runs, tmp_path, "A"), copy(runs, tmp_path, "B")
    before = tree(b)
    with pytest.raises(RunDirError, match="would mix two runs"):
        train(small_cfg(tiny_dir, b, steps=8, seed=7, resume=str(a)))
    assert tree(b) == before
    hist = train(small_cfg(tiny_dir, tmp_path / "C", steps=8, seed=7, resume=str(a)))
    assert [h["step"] for h in hist] == [7, 8] and tree(a) == tree(runs / "A")


def test_a_rewind_needs_overwrite_and_then_replaces_the_newer_steps(tiny_dir, runs, tmp_path):
    """--resume R/ckpt-000003 in R (newest ckpt-000006): refused, untouched; --steps not past the checkpoint:
    refused, untouched; with --overwrite the newer checkpoint goes and steps 4-8 are logged once, in order."""
    from run_dir import RunDirError
    from train import train

    r = copy(runs, tmp_path, "B")
    before = tree(r)
    with pytest.raises(RunDirError, match="rewinds"):
        train(small_cfg(tiny_dir, r, steps=8, resume=str(r / "ckpt-000003")))
    with pytest.raises(RunDirError, match="nothing to run"):
        train(small_cfg(tiny_dir, r, steps=3, resume=str(r / "ckpt-000003")))
    with pytest.raises(RunDirError, match="nothing to run"):
        train(small_cfg(tiny_dir, r, steps=5, resume=str(r)))
    assert tree(r) == before
    train(small_cfg(tiny_dir, r, steps=8, resume=str(r / "ckpt-000003"), overwrite=True))
    assert [json.loads(line)["step"] for line in open(r / "metrics.jsonl")] == list(range(1, 9))
    assert (r / "latest").read_text() == "ckpt-000008"
    assert json.load(open(r / "ckpt-000006" / "train_config.json"))["steps"] == 8  # written again by the new run


def test_overwrite_removes_only_what_train_wrote(tiny_dir, runs, tmp_path):
    """Files of the user's beside a run survive --overwrite; a ckpt-7/ holding something else, or a config.json
    that is not a run's, stops --overwrite before anything is removed."""
    from run_dir import RunDirError
    from train import train

    r = copy(runs, tmp_path, "B")
    (r / "notes.txt").write_text("mine")
    (r / "ckpt-7").mkdir()
    (r / "ckpt-7" / "thesis.tex").write_text("\\documentclass{article}")
    before = tree(r)
    with pytest.raises(RunDirError, match=r"holds \['ckpt-7'\], which train.py did not write"):
        train(small_cfg(tiny_dir, r, overwrite=True))
    assert tree(r) == before
    (r / "ckpt-7" / "thesis.tex").unlink()
    (r / "ckpt-7").rmdir()
    train(small_cfg(tiny_dir, r, steps=2, save_every=2, overwrite=True))
    assert (r / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in open(r / "metrics.jsonl")] == [1, 2]
    assert sorted(d for d in os.listdir(r) if d.startswith("ckpt-")) == ["ckpt-000002"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"project": "not a training run"}')
    with pytest.raises(RunDirError, match="holds an earlier run"):
        train(small_cfg(tiny_dir, other))
    with pytest.raises(RunDirError, match=r"\['config.json'\], which train.py did not write"):
        train(small_cfg(tiny_dir, other, overwrite=True))
    assert (other / "config.json").read_text() == '{"project": "not a training run"}'


def test_a_bad_data_file_with_overwrite_loses_nothing(tiny_dir, runs, tmp_path):
    """--overwrite removes the earlier run only once everything is loaded: a bad --data stops it first."""
    from data import DataError
    from train import train

    r = copy(runs, tmp_path, "B")
    before = tree(r)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n')
    with pytest.raises(DataError):
        train(small_cfg(tiny_dir, r, overwrite=True, data=str(bad)))
    assert tree(r) == before


def test_falling_back_past_a_corrupted_checkpoint_warns(tiny_dir, runs, tmp_path, capsys):
    from run_dir import find_resume

    r = copy(runs, tmp_path, "B")
    with open(r / "ckpt-000006" / "adapter.safetensors", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    assert find_resume(str(r)) == str(r / "ckpt-000003")
    out = capsys.readouterr().out
    assert "warning:" in out and "ckpt-000006" in out


# ----------------------------------------------------------------------------------------------------------
# run directories: owned by one run, never silently mixed or pruned away; which checkpoint a resume takes


@pytest.fixture(scope="module")
def done_run(tiny_dir, tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6) to copy from."""
    from train import train

    out = tmp_path_factory.mktemp("done") / "run"
    train(small_cfg(tiny_dir, out, keep=5))
    return out


def copy_run(done_run, tmp_path):
    import shutil

    shutil.copytree(done_run, tmp_path / "run")
    return tmp_path / "run"


def test_fresh_start_into_an_earlier_run_is_refused_and_changes_nothing(tiny_dir, done_run, tmp_path):
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    before = tree(run)
    with pytest.raises(RunDirError, match=r"holds an earlier run \(.*\): --resume .* --overwrite"):
        train(small_cfg(tiny_dir, run, steps=2))
    assert tree(run) == before
    hist = train(small_cfg(tiny_dir, run, steps=2, save_every=1, overwrite=True))
    assert [h["step"] for h in hist] == [1, 2]
    assert sorted(d for d in os.listdir(run) if d.startswith("ckpt-")) == ["ckpt-000001", "ckpt-000002"]
    assert [json.loads(l)["step"] for l in open(run / "metrics.jsonl")] == [1, 2]


def test_prune_by_parsed_step_never_latest_nor_the_new_one(tmp_path):
    from run_dir import prune

    for s in (2, 10, 100, 1000):
        (tmp_path / f"ckpt-{s:06d}").mkdir()
    (tmp_path / "ckpt-1000000").mkdir()  # seven digits: sorts first by name, last by step
    (tmp_path / "latest").write_text("ckpt-000010")
    prune(str(tmp_path), keep=1, protect={"ckpt-000100"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000010", "ckpt-000100", "ckpt-1000000", "latest"]


@pytest.mark.parametrize("latest", ["missing", "dangling", "hostile"])
def test_resume_falls_back_to_the_newest_valid_checkpoint(tiny_dir, done_run, tmp_path, latest):
    from run_dir import find_resume

    run = copy_run(done_run, tmp_path)
    if latest == "missing":
        os.remove(run / "latest")
    else:
        (run / "latest").write_text("ckpt-000999" if latest == "dangling" else "../../etc")
    assert find_resume(str(run)) == str(run / "ckpt-000006")
    with open(run / "ckpt-000006" / "adapter.safetensors", "r+b") as f:  # corrupt the newest: the older is taken
        f.seek(200)
        f.write(b"\0" * 64)
    assert find_resume(str(run)) == str(run / "ckpt-000003")


def test_resume_on_a_new_or_empty_dir_starts_fresh(tiny_dir, tmp_path):
    from train import train

    hist = train(small_cfg(tiny_dir, tmp_path / "new", steps=2, resume=str(tmp_path / "new")))
    assert [h["step"] for h in hist] == [1, 2]
    hist = train(small_cfg(tiny_dir, tmp_path / "new", steps=3, resume=str(tmp_path / "new")))
    assert [h["step"] for h in hist] == [3]  # the same command continues it


def test_resume_trims_metrics_and_applies_a_new_lr(tiny_dir, done_run, tmp_path, capsys):
    from train import lr_at, train

    run = copy_run(done_run, tmp_path)
    import shutil
    shutil.rmtree(run / "ckpt-000006")
    (run / "latest").write_text("ckpt-000003")  # as if killed after step 6 was logged but before its save
    hist = train(small_cfg(tiny_dir, run, resume=str(run), lr=5e-4))
    assert "resume: --lr 0.001 -> 0.0005 (applied)" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    cfg = small_cfg(tiny_dir, run, lr=5e-4)
    assert hist[0]["lr"] == pytest.approx(5e-4 * lr_at(3, cfg))  # step 4 used the new lr, on the same schedule
    assert json.load(open(run / "config.json"))["lr"] == 5e-4


def test_resume_with_other_adapter_shapes_is_refused(tiny_dir, done_run, tmp_path):
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    before = tree(run)
    with pytest.raises(RunDirError, match=r"differ from the checkpoint .*'rank': \(4, 2\)"):
        train(small_cfg(tiny_dir, run, resume=str(run), rank=2))
    assert tree(run) == before


def edit_saved_config(run, fn):
    """Rewrite the newest checkpoint's train_config.json through ``fn`` (and its manifest: an old or edited
    config whose checksums are right)."""
    from adapter_io import write_manifest
    from run_dir import find_resume

    ckpt = find_resume(str(run))
    cfg_file = os.path.join(ckpt, "train_config.json")
    saved = fn(json.load(open(cfg_file)))
    with open(cfg_file, "w") as f:
        json.dump(saved, f)
    write_manifest(ckpt)


def test_resume_keeps_the_router_and_reads_older_checkpoints_as_token_routers(tiny_dir, done_run, tmp_path):
    """--router decides which tensors a checkpoint holds: a switch is refused; a train_config.json from before
    --router existed (no such key) is read as the token router it had."""
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    with pytest.raises(RunDirError, match=re.escape("'router': ('context', 'token')")):
        train(small_cfg(tiny_dir, run, resume=str(run), router="token"))
    edit_saved_config(run, lambda saved: {k: v for k, v in saved.items() if k != "router"})
    with pytest.raises(RunDirError, match=re.escape("'router': ('token', 'context')")):
        train(small_cfg(tiny_dir, run, resume=str(run)))


def test_a_checkpoint_written_before_the_flags_changed_resumes(tiny_dir, done_run, tmp_path, capsys):
    """Settings under their old names (--queue --queue-size K, --z-loss, no --cl-debias) and removed ones
    (--cl-views sequence, --proj-dim, ...) resume as the run they were: the renamed ones read in today's names,
    the removed ones ignored, a missing --cl-debias as plain InfoNCE (the change logged)."""
    from train import train

    run = copy_run(done_run, tmp_path)

    def old(saved):
        saved = {k: v for k, v in saved.items() if k not in ("queue", "lambda_z", "cl_debias")}
        return {**saved, "queue": False, "queue_size": 1024, "z_loss": 0.0, "cl_views": "sequence", "proj_dim": 64,
                "queue_momentum": 0.0, "router_warmup": 0, "skip_bad": False, "log_every": 1}

    edit_saved_config(run, old)
    capsys.readouterr()
    assert [h["step"] for h in train(small_cfg(tiny_dir, run, resume=str(run), steps=7))] == [7]
    assert "resume: --cl-debias 0.0 -> 0.125 (applied)" in capsys.readouterr().out


@pytest.mark.parametrize("removed, needle", [
    ({"cl_views": "mixture"}, "the 'mixture' contrastive reading, which was removed"),
    ({"cl_views": "assign"}, "the 'assign' contrastive reading, which was removed"),
    ({"router_warmup": 10}, "inside its --router-warmup 10, which was removed"),
])
def test_a_checkpoint_of_a_removed_reading_is_refused_in_one_line(tiny_dir, done_run, tmp_path, removed, needle):
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    edit_saved_config(run, lambda saved: {**saved, **removed})
    with pytest.raises(RunDirError, match=re.escape(needle) + ".*commit 62a67a4 still resumes it"):
        train(small_cfg(tiny_dir, run, resume=str(run)))


@pytest.mark.parametrize("change, needle", [
    (dict(lambda_cl=0.0, cl_debias=None), "'contrastive loss on': (True, False)"),
    (dict(queue=16), "'queue': (0, 16)"),
])
def test_resume_that_switches_a_loss_part_is_refused(tiny_dir, done_run, tmp_path, change, needle):
    """The contrastive term on/off and the queue decide which tensors a checkpoint holds."""
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    with pytest.raises(RunDirError, match=re.escape(needle)):
        train(small_cfg(tiny_dir, run, resume=str(run), **change))


def test_resume_from_an_invalid_train_config_is_refused(tiny_dir, done_run, tmp_path):
    """A config whose checksums are right but whose values are not (edited, manifest rewritten)."""
    from run_dir import RunDirError, find_resume
    from adapter_io import write_manifest
    from train import train

    run = copy_run(done_run, tmp_path)
    ckpt = find_resume(str(run))
    cfg_file = os.path.join(ckpt, "train_config.json")
    saved = json.load(open(cfg_file))
    with open(cfg_file, "w") as f:
        json.dump({**saved, "top_k": 99}, f)
    write_manifest(ckpt)
    with pytest.raises(RunDirError, match="not a valid config: top_k=99"):
        train(small_cfg(tiny_dir, run, resume=str(run)))


def test_corrupted_checkpoint_is_refused_on_adapter_load(tiny_dir, done_run, tmp_path):
    from adapter_io import load_adapter
    from model import load_model

    run = copy_run(done_run, tmp_path)
    path = run / "ckpt-000006" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-256:] = b"\0" * 256  # same size, zeroed bytes: the queues' tail
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checkpoint's manifest.json"):
        load_adapter(load_model(tiny_dir), str(run / "ckpt-000006"))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SPARSEDOCTOR_PWNED']}",))


def test_a_booby_trapped_pickle_is_never_run(tiny_dir, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SPARSEDOCTOR_PWNED", str(marker))
    ck = tmp_path / "shared_run" / "ckpt-000003"
    ck.mkdir(parents=True)
    with open(ck / "state.pt", "wb") as f:
        pickle.dump({"step": 3, "x": Payload()}, f)
    (tmp_path / "shared_run" / "latest").write_text("ckpt-000003")
    data = os.path.join(ROOT, "samples", "med_sample.jsonl")
    r = subprocess.run([sys.executable, "train.py", "--model", tiny_dir, "--data", data, "--out", str(tmp_path / "o"),
                        "--resume", str(tmp_path / "shared_run"), "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "old-format checkpoint (state.pt, a pickle)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not marker.exists()
    src = "".join(open(os.path.join(ROOT, f), encoding="utf-8").read() for f in os.listdir(ROOT) if f.endswith(".py"))
    assert "torch.load(" not in src and "pickle.load" not in src  # nothing we read is unpickled


def test_a_second_run_into_a_locked_dir_stops(tiny_dir, tmp_path):
    from outputs import OutputError, OutputLock
    from train import train

    lock = OutputLock(str(tmp_path / "busy"))
    try:
        with pytest.raises(OutputError, match="being written by another command"):
            train(small_cfg(tiny_dir, tmp_path / "busy"))
    finally:
        lock.release()
    assert not os.path.exists(tmp_path / "busy" / "config.json")


def test_non_finite_loss_stops_before_the_update_and_writes_nothing(tiny_dir, tmp_path):
    from train import train

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(small_cfg(tiny_dir, tmp_path / "nan", temperature=1e-40, cl_debias=0.0, save_every=1))
    assert not any(d.startswith("ckpt-") for d in os.listdir(tmp_path / "nan"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_checkpoint_with_any_non_finite_value_is_never_written(tmp_path, bad):
    from checkpoint import save_checkpoint

    with pytest.raises(FloatingPointError, match="non-finite values"):
        save_checkpoint(str(tmp_path), 1, None, {"w": torch.tensor([1.0, bad])}, {}, None, None, None)
    assert os.listdir(tmp_path) == []


def test_an_infinite_gradient_norm_with_a_finite_loss_is_not_applied(tiny_dir, tmp_path, monkeypatch):
    """The guard reads the gradient norm too: a step whose norm is inf (the loss finite) stops before the
    update, and the adapters stay as they were."""
    import train as T

    def infinite_norm(params, max_norm, *a, **k):
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", infinite_norm)
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with pytest.raises(FloatingPointError, match=r"gradient norm \(inf\)"):
        T.train(small_cfg(tiny_dir, tmp_path / "g", save_every=1))
    assert steps == [] and not any(d.startswith("ckpt-") for d in os.listdir(tmp_path / "g"))


def test_a_run_dir_holding_only_metrics_is_an_earlier_run(tiny_dir, tmp_path):
    """metrics.jsonl alone (its checkpoints deleted) is still a run's history: a fresh start stops without
    --overwrite and leaves it byte-identical."""
    from run_dir import RunDirError
    from train import train

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm": 1.0}) + "\n")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="holds an earlier run"):
        train(small_cfg(tiny_dir, run))
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("change", [dict(lr=5e-4), dict(warmup=5), dict(steps=9)])
def test_every_optimiser_setting_given_on_resume_holds_for_every_later_step(tiny_dir, tmp_path, change):
    """Resuming step 3 of 6 with a new --lr, --warmup or --steps: every later step's lr is the new run's
    schedule (lr_at of the new settings, times the new --lr), not the checkpoint's, and so is the scheduler's
    state written at the end."""
    from checkpoint import read_training_state
    from train import lr_at, train

    train(small_cfg(tiny_dir, tmp_path / "r", steps=3, save_every=3))
    cfg = small_cfg(tiny_dir, tmp_path / "r", resume=str(tmp_path / "r"), save_every=3, **change)
    old = small_cfg(tiny_dir, tmp_path / "x", save_every=3)
    hist = train(cfg)
    assert [h["step"] for h in hist] == list(range(4, cfg.steps + 1))
    for h in hist:
        assert h["lr"] == pytest.approx(cfg.lr * lr_at(h["step"] - 1, cfg), rel=1e-9), h["step"]
    assert any(h["lr"] != pytest.approx(old.lr * lr_at(h["step"] - 1, old), rel=1e-6) for h in hist)  # can tell
    sched = read_training_state(str(tmp_path / "r" / f"ckpt-{cfg.steps:06d}"))["scheduler"]
    assert sched["base_lrs"] == [pytest.approx(cfg.lr)]


@pytest.mark.parametrize("name, garbage, drop", [("train_config.json", b"[1, 2", False), ("state.json", b"{}", False),
                                                 ("state.json", b'{"__dict__": 3}', True)])
def test_resume_of_a_checkpoint_dir_verifies_it_before_reading_it(tiny_dir, done_run, tmp_path, name, garbage, drop):
    """--resume CKPT_DIR with a damaged train_config.json or state.json (or one whose line is taken out of the
    manifest): one line naming the file, before anything of it is parsed (was: AttributeError, TypeError or
    StopIteration tracebacks); the run dir is left as it was."""
    from run_dir import RunDirError
    from train import train

    run = copy_run(done_run, tmp_path)
    ckpt = run / "ckpt-000006"
    (ckpt / name).write_bytes(garbage)
    if drop:
        sums = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps({k: v for k, v in sums.items() if k != name}))
    before = tree(run)
    want = f"manifest.json does not list {name}" if drop else f"{name} is missing or does not match"
    with pytest.raises(RunDirError, match=re.escape(want)):
        train(small_cfg(tiny_dir, tmp_path / "elsewhere", resume=str(ckpt), steps=8))
    assert tree(run) == before


def test_a_compile_that_cannot_work_stops_before_overwrite_removes_anything(tiny_dir, done_run, tmp_path, monkeypatch):
    """--compile --overwrite on a machine whose torch.compile fails: one line before anything is removed (the
    layers compile only at the first step, after --overwrite's removal)."""
    import torch

    from train import train

    run = copy_run(done_run, tmp_path)
    before = tree(run)

    def broken(fn=None, *a, **k):  # wrapping works; the first call compiles, and fails, as without a compiler
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(120 more lines)")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError, match=r"--compile: torch.compile does not work on this machine \(InductorError"):
        train(small_cfg(tiny_dir, run, compile=True, overwrite=True))
    assert tree(run) == before
