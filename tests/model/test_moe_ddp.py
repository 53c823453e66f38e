"""Plain DDP (no find_unused_parameters) over an MoE block whose ranks route to different experts."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moe_llava.model import SparseMoeBlock

D = 8


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    # A file rendezvous (no port to race for) and a 60 s limit: a lost rank is an error, not a hang.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        block = SparseMoeBlock.from_dense(mlp, num_experts=4, top_k=1)
        with torch.no_grad():  # rank 0's tokens all go to expert 0, rank 1's to expert 3
            block.router.weight.zero_()
            block.router.weight[0, 0] = block.router.weight[3, 1] = 50.0
        model = DistributedDataParallel(block)  # find_unused_parameters=False (the default)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.zeros(4, D)
        x[:, rank] = 1.0
        for _ in range(3):
            loss = model(x).square().mean() + block.aux_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert block.last_stats.top1.nonzero().flatten().tolist() == [0 if rank == 0 else 3]
        torch.save({k: v.clone() for k, v in block.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_ddp_without_find_unused_parameters_keeps_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Both ranks' experts moved: gradients of experts 0 and 3 were all-reduced into both.
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)).state_dict()
    assert not torch.equal(rank0["experts.0.0.weight"], initial["0.weight"])
    assert not torch.equal(rank0["experts.3.0.weight"], initial["0.weight"])
    assert torch.equal(rank0["experts.1.0.weight"], initial["0.weight"])
