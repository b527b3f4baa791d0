"""The output rule (outputs.py) in every command that writes: train.py, eval.py, prepare.py, adapter_io.py.
Each refusal is one line (exit 2 from the command line) and leaves every file byte-identical."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, exit_status, small_cfg, tree

SAMPLE = os.path.join(ROOT, "samples", "benchmarks")
MED = os.path.join(ROOT, "samples", "med_sample.jsonl")


def cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def prepare(*args) -> int:
    import prepare as P

    return exit_status(P.main, *args)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    """A finished 2-step plain-LoRA run (a peft export can be made of it), a checkpoint at step 2."""
    from train import train

    run = tmp_path_factory.mktemp("lora") / "run"
    train(small_cfg(tiny_dir, run, steps=2, save_every=2, num_experts=1, top_k=1, queue=0, lambda_cl=0.0))
    return run


def test_prepare_never_writes_into_what_it_reads_nor_over_a_file_it_did_not_write(tmp_path, capsys):
    import shutil

    bench = tmp_path / "cmmlu"
    shutil.copytree(os.path.join(SAMPLE, "cmmlu"), bench)
    before = tree(bench)
    # the benchmark's own file (--out inside the --data-dir), even with --overwrite
    victim = next(os.path.join(r, f) for r, _, fs in os.walk(bench) for f in fs if f.endswith(".csv"))
    assert prepare("export", "cmmlu-med", "--data-dir", str(bench), "--split", "dev", "--out", victim,
                   "--overwrite") == 2
    assert "which this command reads" in capsys.readouterr().err and tree(bench) == before
    # a user's file at --out: refused without --overwrite, and with it (not an export's)
    mine = tmp_path / "notes.jsonl"
    mine.write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        assert prepare("export", "cmmlu-med", "--data-dir", str(bench), "--split", "dev", "--out", str(mine),
                       *extra) == 2
        assert mine.read_text() == "my notes\n"
    # an earlier export: refused without --overwrite, replaced with it
    out = tmp_path / "ex.jsonl"
    args = ["export", "cmmlu-med", "--data-dir", str(bench), "--split", "dev", "--out", str(out)]
    assert prepare(*args) == 0 and prepare(*args) == 2 and prepare(*args, "--overwrite") == 0


def test_decontaminate_never_writes_over_its_input_through_a_link_or_a_side_file(tmp_path, capsys):
    data = tmp_path / "med.jsonl"
    data.write_bytes(open(MED, "rb").read())
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    bench = f"cmexam={os.path.join(SAMPLE, 'cmexam')}"
    side = tmp_path / "x.matches.jsonl"  # --out x makes x.matches.jsonl: here that is the input
    side.write_bytes(open(MED, "rb").read())
    for src, out in ((data, link), (link, data), (side, tmp_path / "x")):
        before = tree(tmp_path)
        assert prepare("decontaminate", str(src), "--bench", bench, "--out", str(out), "--overwrite") == 2
        assert "which this command reads" in capsys.readouterr().err, (src, out)
        assert {k: v for k, v in tree(tmp_path).items() if not k.endswith(".lock")} == \
            {k: v for k, v in before.items() if not k.endswith(".lock")}


def test_a_peft_export_never_writes_into_a_checkpoint_and_replaces_only_an_export(lora_run, tmp_path):
    from adapter_io import export_peft
    from outputs import OutputError

    before = tree(lora_run)
    for out in (lora_run / "ckpt-000002", lora_run / "ckpt-000002" / "peft"):
        with pytest.raises(OutputError):
            export_peft(str(lora_run), str(out), overwrite=True)
    assert tree(lora_run) == before
    out = tmp_path / "peft"
    export_peft(str(lora_run), str(out))
    with pytest.raises(OutputError, match="exists: choose another --out, or --overwrite"):
        export_peft(str(lora_run), str(out))
    export_peft(str(lora_run), str(out), overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter_config.json").write_text('{"my": "config"}')
    with pytest.raises(OutputError, match="not written by this command"):
        export_peft(str(lora_run), str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "adapter_config.json").read_text() == '{"my": "config"}'


def test_two_evals_into_one_out_are_refused_by_the_lock(tmp_path):
    from outputs import OutputLock

    out = tmp_path / "ev"
    lock = OutputLock(str(out))
    try:
        r = cli("eval.py", "cmexam", "--limit", "2", "--out", str(out))
    finally:
        lock.release()
    assert r.returncode == 2 and "being written by another command" in r.stderr
    assert os.listdir(out) == [".lock"]


def test_train_follows_no_planted_link_and_removes_no_dir_named_like_its_files(tiny_dir, lora_run, tmp_path):
    import shutil

    from outputs import OutputError
    from run_dir import RunDirError
    from train import train

    user = tmp_path / "user.txt"
    user.write_text("mine")
    # a run whose checkpoint holds a *dir* named like a checkpoint file: --overwrite removes nothing
    r = tmp_path / "r"
    shutil.copytree(lora_run, r)
    os.remove(r / "ckpt-000002" / "state.json")
    (r / "ckpt-000002" / "state.json").mkdir()
    (r / "ckpt-000002" / "state.json" / "thesis.tex").write_text("mine")
    before = tree(r)
    with pytest.raises(RunDirError, match="which train.py did not write"):
        train(small_cfg(tiny_dir, r, steps=2, save_every=2, overwrite=True))
    assert tree(r) == before
    # links planted where train.py writes its temp files: its files go elsewhere, the user's file is unchanged
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("config.json.tmp", "latest.tmp", "metrics.jsonl.tmp"):
        (fresh / name).symlink_to(user)
    (fresh / "ckpt-000002.tmp").symlink_to(tmp_path)
    for overwrite, match in ((False, "holds an earlier run"), (True, "which train.py did not write")):
        with pytest.raises(RunDirError, match=match):
            train(small_cfg(tiny_dir, fresh, steps=2, save_every=2, overwrite=overwrite))
    assert user.read_text() == "mine" and not (tmp_path / "adapter.safetensors").exists()
    os.remove(fresh / "ckpt-000002.tmp")
    train(small_cfg(tiny_dir, fresh, steps=2, save_every=2))
    assert user.read_text() == "mine" and os.path.islink(fresh / "latest.tmp")
    # a run nested in another run's checkpoint dir
    before = tree(lora_run)
    with pytest.raises(OutputError, match="inside the checkpoint ckpt-000002"):
        train(small_cfg(tiny_dir, lora_run / "ckpt-000002", steps=2))
    assert tree(lora_run) == before
