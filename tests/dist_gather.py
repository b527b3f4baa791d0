"""Run by tests/test_parallel.py: `torchrun --nproc_per_node=2 tests/dist_gather.py OUT` (gloo, CPU). Each rank
holds a different number of rows (rank 0: 3, rank 1: 1, then rank 0: 0); saves what the gathers and sums gave."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parallel  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    r = dist.get_rank()
    rows = {0: 3, 1: 1}[r]
    x = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * r  # (rows, 2), rank-tagged
    present = torch.tensor([True, False, True][:rows])
    empty = torch.zeros(0 if r == 0 else 2, 2) + 7  # rank 0 holds none
    out = {"varlen": parallel.all_gather_varlen(x), "bool": parallel.all_gather_varlen(present),
           "empty": parallel.all_gather_varlen(empty), "sum": torch.tensor(parallel.all_sum([1.5 * (r + 1), r], "cpu")),
           "objects": parallel.all_gather_objects({"rank": r, "rows": rows})}
    torch.save(out, os.path.join(sys.argv[1], f"rank{r}.pt"))
    dist.destroy_process_group()
