"""chat.py and plot_routing.py on a trained run: the adapter loads from run/latest and answers; stdin that is
closed, empty or not UTF-8 ends cleanly."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_at_once


def test_plot_routing_and_chat_with_adapter(tmp_path):
    """A short train.py run -> plot_routing draws its PNGs; chat.py --adapter loads run/latest and answers."""
    from tiny_qwen import make_tiny_checkpoint
    from train import TrainConfig, train

    model_dir = make_tiny_checkpoint(str(tmp_path / "m"), hidden_size=32, intermediate_size=64, head_dim=16,
                                     num_hidden_layers=2)
    run = tmp_path / "run"
    train(TrainConfig(model=model_dir, out=str(run), steps=3, batch_size=2, max_len=256, num_experts=4, rank=4))
    import plot_routing

    files = plot_routing.plot_run(str(run))
    assert [os.path.basename(f) for f in files] == ["routing_load.png", "routing_entropy.png", "routing_losses.png"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(f) > 5000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_routing.read_metrics(str(tmp_path))

    r = subprocess.run([sys.executable, "chat.py", "--model", model_dir, "--adapter", str(run / "latest"),
                        "--prompt", "头痛怎么办？", "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(adapter: " + str(run / "ckpt-000003") + ")" in r.stdout


def test_chat_stdin_closed_empty_or_not_utf8(tiny_dir):
    bad, empty, closed = run_at_once((["chat.py", "--model", tiny_dir, "--max-new-tokens", "2"], b"\xff\xfe\n"),
                                     (["chat.py", "--model", tiny_dir], b""),
                                     f"{sys.executable} chat.py --model {tiny_dir} <&-")
    assert bad.returncode == 2 and b"stdin is not UTF-8" in bad.stderr and b"Traceback" not in bad.stderr
    assert empty.returncode == 0 and b"Traceback" not in empty.stderr
    assert closed.returncode == 0 and b"Traceback" not in closed.stderr
