"""Every command's user-facing errors, run as commands: one line naming the problem, exit status 2, no
traceback."""
import pytest

from conftest import run_at_once


def test_cli_one_line_errors(tiny_dir, tmp_path):
    cases = [
        (["train.py", "--model", tiny_dir, "--resume", str(tmp_path / "f.txt")], "not a run dir or checkpoint dir"),
        (["chat.py", "--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1"),
        (["chat.py", "--model", tiny_dir, "--adapter", str(tmp_path)], "adapter_config.json not found"),
    ]
    (tmp_path / "f.txt").write_text("x")
    runs = run_at_once(*(args for args, _ in cases))
    assert len(runs) == len(cases)
    for (args, needle), r in zip(cases, runs):
        stderr = r.stderr.decode()
        err = stderr.strip().splitlines()
        assert r.returncode == 2 and needle in stderr and "Traceback" not in stderr, (args, stderr[-1500:])
        assert len([l for l in err if l.startswith(("error", "train.py", "chat.py"))]) == 1




def test_ctrl_c_is_one_line_and_exit_130():
    import cli

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run(interrupted, debug=False)
    assert e.value.code == 130
