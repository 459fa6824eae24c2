"""A spawned worker for test_bad_input_round2: the last rank sleeps past the group's timeout (as a
SIGSTOPped process would); the others meet it in an all_reduce and describe the failure as
cli.run_main would. A module of its own: spawn imports it in every process, so it stays light."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from tests.processes import run_in_group


def silent_rank_worker(rank: int, world: int, port: int, job: str, out_dir: str) -> None:
    def body():
        if rank == world - 1:
            time.sleep(4)
            return None
        try:
            dist.all_reduce(torch.ones(1))
        except RuntimeError as err:
            from deqlit.cli import describe_error
            return describe_error(err)
        return "no error"
    run_in_group(rank, world, port, out_dir, 1.5, body)
