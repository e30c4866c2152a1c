"""Tensor-parallel gated RMSNorm over 2 CPU processes (gloo): the public API of ``gatednorm.distributed``.

    python examples/tensor_parallel.py                # 2 processes (default)
    python examples/tensor_parallel.py --world-size 4

Each process holds a contiguous slice of the hidden dimension (rank r: columns [r*N/P, (r+1)*N/P)) of
the activations x, the gate z and the weight, as in a Mamba2 mixer split over tensor-parallel ranks.
The script

1. builds ``TPGatedRMSNorm`` with the FULL hidden size and loads an unsharded checkpoint (each rank
   keeps its shard), once with one group per row spanning every rank (one all_reduce per forward)
   and once with groups that fit inside a shard (no communication);
2. calls the functional form ``tp_gated_norm``, which also returns the statistics of the groups that
   touch this rank (see ``shard_layout``);
3. runs a backward, and gathers the weight gradient shards with ``gather_weight``;
4. checks every result against gatednorm on the full, unsharded tensors in one process.

It runs on CPU with the gloo backend over loopback, in a few seconds; on GPUs use NCCL and CUDA
tensors the same way (docs/usage.md, "Tensor parallel").
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gatednorm
from gatednorm.distributed import TPGatedRMSNorm, gather_weight, shard_layout, shard_weight, tp_gated_norm

HIDDEN = 384  # N, the full hidden size
ROWS = 6  # tokens; replicated on every tensor-parallel rank


def full_inputs() -> dict[str, torch.Tensor]:
    """The unsharded tensors, the same on every rank (a fixed seed stands in for the model)."""
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(ROWS, HIDDEN, generator=g),
        "z": torch.randn(ROWS, HIDDEN, generator=g),
        "weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "dy": torch.randn(ROWS, HIDDEN, generator=g),
    }


def worker(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        run(rank, world_size)
    finally:
        dist.destroy_process_group()


def run(rank: int, world_size: int) -> None:
    t = full_inputs()
    x_local = shard_weight(t["x"], rank, world_size)  # any (..., N) tensor: this rank's columns, a copy
    z_local = shard_weight(t["z"], rank, world_size)
    shard = HIDDEN // world_size
    cols = slice(rank * shard, (rank + 1) * shard)

    for group_size, what in ((None, "one group over all ranks: one all_reduce"),
                             (shard // 2, "groups inside each shard: no communication")):
        # 1. The module: hidden_size is the FULL size; a full (N,) checkpoint is sharded on load.
        norm = TPGatedRMSNorm(HIDDEN, eps=1e-5, group_size=group_size, norm_before_gate=False)  # default group
        norm.load_state_dict({"weight": t["weight"]})
        assert norm.weight.shape == (shard,)
        x = x_local.clone().requires_grad_()
        y_local = norm(x, z_local)

        # the same operator on the unsharded tensors, in one process
        x_full = t["x"].clone().requires_grad_()
        w_full = t["weight"].clone().requires_grad_()
        y_full = gatednorm.rmsnorm_fn(x_full, w_full, None, t["z"], eps=1e-5, group_size=group_size,
                                      norm_before_gate=False)
        torch.testing.assert_close(y_local, y_full[:, cols].detach(), rtol=1e-5, atol=1e-5)

        # 3. Backward: dx is this rank's slice of the full dx; dweight is local (each rank owns its columns).
        y_local.backward(shard_weight(t["dy"], rank, world_size))
        y_full.backward(t["dy"])
        torch.testing.assert_close(x.grad, x_full.grad[:, cols], rtol=1e-4, atol=1e-5)
        dweight = gather_weight(norm.weight.grad)  # collective: every rank calls it
        torch.testing.assert_close(dweight, w_full.grad, rtol=1e-4, atol=1e-5)
        if rank == 0:
            print(f"TPGatedRMSNorm, group_size={group_size} ({what}): output, dx and dweight match "
                  f"the unsharded operator on {world_size} ranks")

    # 2. The functional form, with the statistics of the local groups. Groups of 128 features on shards of
    # 384 / P: with 2 ranks (shards of 192) the middle group crosses the boundary and both ranks hold it.
    group_size = 128
    w_local = shard_weight(t["weight"], rank, world_size)
    y, mean, rstd = tp_gated_norm(x_local, w_local, None, z_local, eps=1e-5, group_size=group_size,
                                  is_rms_norm=True, full_hidden_size=HIDDEN)
    _, _, rstd_full = gatednorm.layer_norm_fwd(t["x"], t["weight"], None, 1e-5, z=t["z"], group_size=group_size,
                                               is_rms_norm=True)
    lay = shard_layout(HIDDEN, group_size, rank, world_size)
    first, count = lay.first_group, lay.num_local_groups
    assert mean is None  # RMSNorm
    torch.testing.assert_close(rstd, rstd_full[first * ROWS:(first + count) * ROWS], rtol=1e-5, atol=0)
    columns = f"[{lay.col_start}, {lay.col_start + lay.shard_size})"
    print(f"rank {rank}: tp_gated_norm, groups of {group_size}: columns {columns}, "
          f"local groups {first}..{first + count - 1}, rstd {tuple(rstd.shape)} = the full operator's slice")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="processes (a divisor of 384; default 2)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process: the ranks share the machine
    mp.spawn(worker, args=(args.world_size, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
