"""Every command's user-facing errors, run as commands: one line naming the problem, exit status 2, no
traceback."""
import pytest

from conftest import run_at_once


def test_cli_one_line_errors(tiny_dir, tmp_path):
    cases = [
        (["train.py", "--model", tiny_dir, "--resume", str(tmp_path / "f.txt")], "not a run dir or checkpoint dir"),
        (["chat.py", "--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1"),
        (["chat.py", "--model", tiny_dir, "--adapter", str(tmp_path)], "adapter_config.json not found"),
        (["adapter_io.py", str(tmp_path / "nothing"), str(tmp_path / "peft")], "nothing"),
        (["prepare.py", "export", "cmexam", "--data-dir", str(tmp_path / "cm"), "--split", "val", "--out",
          str(tmp_path / "x.jsonl")], "val.csv not found"),
        (["prepare.py", "export", "cmexam", "--data-dir", str(tmp_path), "--split", "dev", "--out",
          str(tmp_path / "x.jsonl")], "--split dev: cmexam has test, val, train"),
        (["train.py", "--queue", "8", "--lambda-cl", "0"], "--queue holds negatives of the contrastive term"),
    ]
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "cm").mkdir()
    runs = run_at_once(*(args for args, _ in cases))
    assert len(runs) == len(cases)
    for (args, needle), r in zip(cases, runs):
        stderr = r.stderr.decode()
        err = stderr.strip().splitlines()
        assert r.returncode == 2 and needle in stderr and "Traceback" not in stderr, (args, stderr[-1500:])
        assert len([l for l in err if l.startswith(("error", "train.py", "chat.py", "prepare.py", "adapter_io.py"))]) == 1
    assert not (tmp_path / "peft").exists() and not (tmp_path / "x.jsonl").exists()




def test_ctrl_c_is_one_line_and_exit_130():
    import cli

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run(interrupted, debug=False)
    assert e.value.code == 130


def test_a_non_finite_stop_through_train_py_is_one_line_and_exit_2(tiny_dir, tmp_path):
    """A loss that turns non-finite (tau 1e-40) stops the command before the update: one line naming it, exit 2,
    no traceback, no checkpoint."""
    (r,) = run_at_once(["train.py", "--model", tiny_dir, "--out", str(tmp_path / "o"), "--temperature", "1e-40",
                        "--cl-debias", "0", "--steps", "2", "--max-len", "96"])
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert [l for l in err.splitlines() if l.startswith("error")] == [l for l in err.splitlines() if "non-finite" in l]
    assert len([l for l in err.splitlines() if l.startswith("error")]) == 1
    assert not any(d.startswith("ckpt-") for d in __import__("os").listdir(tmp_path / "o"))
