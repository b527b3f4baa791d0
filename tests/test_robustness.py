"""Careless and hostile input: every case gets a one-line error (exit 2) naming the flag or file, and
nothing on disk that should survive is changed. No pickle is ever read."""
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from conftest import ROOT, small_cfg


def one_line_exit(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# train.py flags: checked in parse_args, before anything is loaded


@pytest.mark.parametrize("flags, needle", [
    (["--top-k", "9"], "top_k=9 must be in [1, num_experts=8]"),
    (["--rank", "0"], "--rank: must be >= 1, got 0"),
    (["--num-experts", "0"], "--num-experts: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--ce-chunk", "0"], "--ce-chunk: must be >= 1"),
    (["--keep", "0"], "--keep: must be >= 1"),
    (["--keep", "-1"], "--keep: must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--max-len", "-5"], "--max-len: must be >= 2"),
    (["--lr", "-0.001"], "--lr: must be in (0"),
    (["--lr", "abc"], "--lr: expected a number"),
    (["--dropout", "1.5"], "--dropout: must be in [0"),
    (["--temperature", "0"], "--temperature: must be in (0"),
    (["--tokens-per-site", "0"], "--tokens-per-site: must be >= 1"),
    (["--targets", "q_proj,vproj"], "['vproj'] not projection names"),
    (["--data", "/nonexistent.jsonl"], "--data: /nonexistent.jsonl is not found"),
    (["--data", ROOT], "is a directory"),
    (["--model", ROOT], "--model: " + ROOT + " has no config.json"),
    (["--queue-momentum", "0.9"], "--queue-momentum moves projection heads, which only the head readings have"),
    (["--queue-momentum", "0.9", "--cl-views", "mixture", "--lambda-cl", "0"], "--queue-momentum moves projection"),
    (["--queue", "--lambda-cl", "0"], "--queue holds negatives of the contrastive term, which is off"),
    (["--queue", "--num-experts", "1", "--top-k", "1"], "--queue holds negatives of the contrastive term"),
    (["--fsdp"], "--fsdp shards over processes: run under torchrun"),
    (["--cl-views", "experts"], "invalid choice: 'experts'"),
])
def test_bad_train_flags(capsys, flags, needle):
    from train import parse_args

    assert needle in one_line_exit(capsys, lambda: parse_args(flags))


def test_unsupported_model_config_is_a_flag_error(capsys, tmp_path):
    from train import parse_args

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                                       "num_attention_heads": 2}), encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert "model_type='llama'" in one_line_exit(capsys, lambda: parse_args(["--model", str(tmp_path)]))


# ----------------------------------------------------------------------------------------------------------
# data: file:line for every bad line, and --skip-bad skips them all


BAD_LINES = [
    (b'{"prompt": "q", "response": "\xff\xfe"}', "not UTF-8"),
    (b'{"instruction": 3, "output": "o"}', "instruction/output must be strings (instruction is int)"),
    (b'{"prompt": "\\ud800", "response": "a"}', "lone UTF-16 surrogate"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "q", "response": "a"', "invalid JSON"),
]


@pytest.mark.parametrize("line, needle", BAD_LINES)
def test_bad_data_lines_name_file_and_line(tmp_path, line, needle):
    from data import DataError, read_jsonl

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "q", "response": "a"}\n' + line + b"\n")
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{needle[:20]}"):
        read_jsonl(str(p))
    examples, bad = read_jsonl(str(p), skip_bad=True)
    assert (len(examples), bad) == (1, 1)


# ----------------------------------------------------------------------------------------------------------
# run directories: owned by one run, never silently mixed or pruned away


def tree(path):
    """Every file under ``path`` with its sha256 (to assert that nothing changed)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f != ".lock":
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
    return out


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


@pytest.mark.parametrize("change, needle", [
    (dict(lambda_cl=0.0, queue=False), "'contrastive loss on': (True, False)"),
    (dict(queue_momentum=0.9), "'momentum key heads': (False, True)"),
])
def test_resume_that_switches_a_loss_part_is_refused(tiny_dir, done_run, tmp_path, change, needle):
    """The contrastive term on/off and momentum key heads decide which tensors a checkpoint holds."""
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
    data = os.path.join(ROOT, "data", "med_sample.jsonl")
    r = subprocess.run([sys.executable, "train.py", "--model", tiny_dir, "--data", data, "--out", str(tmp_path / "o"),
                        "--resume", str(tmp_path / "shared_run"), "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "old-format checkpoint (state.pt, a pickle)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not marker.exists()
    src = "".join(open(os.path.join(ROOT, f), encoding="utf-8").read() for f in os.listdir(ROOT) if f.endswith(".py"))
    assert "torch.load(" not in src and "pickle.load" not in src  # nothing we read is unpickled


def test_a_second_run_into_a_locked_dir_stops(tiny_dir, tmp_path):
    from run_dir import RunDirError, RunLock
    from train import train

    lock = RunLock(str(tmp_path / "busy"))
    try:
        with pytest.raises(RunDirError, match="in use by another run"):
            train(small_cfg(tiny_dir, tmp_path / "busy"))
    finally:
        lock.release()
    assert not os.path.exists(tmp_path / "busy" / "config.json")


def test_non_finite_loss_stops_before_the_update_and_writes_nothing(tiny_dir, tmp_path):
    from train import train

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(small_cfg(tiny_dir, tmp_path / "nan", temperature=1e-40, save_every=1))
    assert not any(d.startswith("ckpt-") for d in os.listdir(tmp_path / "nan"))


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    import torch

    from checkpoint import save_checkpoint

    with pytest.raises(FloatingPointError, match="non-finite values"):
        save_checkpoint(str(tmp_path), 1, None, {"w": torch.tensor([1.0, float("nan")])}, {}, None, None, None)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# the command lines: one line, exit 2


def run_cli(*args, stdin=None, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, input=stdin, **kw)


def test_cli_one_line_errors(tiny_dir, tmp_path):
    cases = [
        (["train.py", "--model", tiny_dir, "--resume", str(tmp_path / "f.txt")], "not a run dir or checkpoint dir"),
        (["chat.py", "--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1"),
        (["chat.py", "--model", tiny_dir, "--adapter", str(tmp_path)], "adapter_config.json not found"),
    ]
    (tmp_path / "f.txt").write_text("x")
    for args, needle in cases:
        r = run_cli(*args, text=True)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
        assert len([l for l in err if l.startswith(("error", "train.py", "chat.py"))]) == 1


def test_chat_stdin_closed_empty_or_not_utf8(tiny_dir):
    r = run_cli("chat.py", "--model", tiny_dir, "--max-new-tokens", "2", stdin=b"\xff\xfe\n")
    assert r.returncode == 2 and b"stdin is not UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = run_cli("chat.py", "--model", tiny_dir, stdin=b"")
    assert r.returncode == 0
    r = subprocess.run(f"{sys.executable} chat.py --model {tiny_dir} <&-", shell=True, cwd=ROOT, capture_output=True)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
