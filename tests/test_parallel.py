"""parallel.py's collectives with unequal sizes per rank (2 processes, gloo): a gather returns exactly every
rank's rows in rank order, none of the padding it uses inside, and every rank gets the same answer."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_gathers_and_sums_with_unequal_sizes_per_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        os.path.join(HERE, "dist_gather.py"), str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    want = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 100])  # 3 rows + 1 row
    for got in (r0, r1):
        assert torch.equal(got["varlen"], want)
        assert torch.equal(got["bool"], torch.tensor([True, False, True, True]))
        assert torch.equal(got["empty"], torch.full((2, 2), 7.0))  # rank 0 gave no rows
        assert got["sum"].tolist() == [1.5 + 3.0, 1.0]
        assert got["objects"] == [{"rank": 0, "rows": 3}, {"rank": 1, "rows": 1}]
