"""Tensor-parallel gated norm over NCCL: correctness first, then the time of one call.

Compares, per case (bf16, Mamba2-style shapes):

* ``tp fwd``        :func:`gatednorm.distributed.tp_gated_norm` on this rank's shard (forward, no grad);
* ``tp fwd+bwd``    the same with x, z and weight requiring grad, forward + backward;
* ``1-GPU full``    the single-GPU operator (:func:`gatednorm.layer_norm_fwd`) on the full tensor;
* ``gather+full``   the naive alternative: all_gather the x and z shards, full norm, keep own columns;
* ``all_reduce``    the bare all_reduce of the spanning path's statistics buffer (latency floor).

Times are per call in microseconds: median over repeats of the mean of a loop of calls, the slowest
rank. Before timing, every case checks on every rank that the tensor-parallel output (bf16) is within
one rounding of the float64 reference and equal within one rounding to the single-GPU operator, and
that fp32 gradients match autograd through the float64 reference; the script exits with status 1
(after writing the JSON) if any check fails.

Run on a machine with 2 GPUs (either form; NCCL_NVLS_ENABLE=0 is set for you)::

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --out bench_distributed.json
    python benchmarks/bench_distributed.py --nproc 2 --out bench_distributed.json

``--device cpu`` runs the same script over gloo on CPU (a smoke test; use ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

# NVLink SHARP (multicast) stays off on the machines this runs on; NCCL reads this at communicator init.
os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gatednorm  # noqa: E402
from gatednorm.distributed import shard_layout, tp_gated_norm  # noqa: E402
from gatednorm.reference import gated_norm_reference  # noqa: E402

# name, hidden N, group_size (None: one group), RMSNorm?, norm_before_gate, bias
CASES = [
    ("mamba2 rms 1 group (gate in)", 8192, None, True, False, False),
    ("mamba2 rms 8 groups (gate in)", 8192, 1024, True, False, False),
    ("rms 3 groups, unaligned (gate in)", 6144, 2048, True, False, False),
    ("ln 1 group (gate out, bias)", 8192, None, False, True, True),
]
ROWS = [256, 4096, 16384]
QUICK_ROWS = [64]


def _log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(fn, device: torch.device, group, iters: int, repeats: int) -> float:
    """Median over repeats of the mean time of `iters` calls, max over ranks (microseconds)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / iters)
    med = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return float(med)


def _ulp_check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Worst |got - ref| in units of (one ulp of dtype at ref + fp32 compute slack); <= 1 means within one rounding."""
    got, ref = got.double(), ref.double()
    mag = ref.abs().clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(dtype).eps
    tol = ulp + 2e-6 * ref.abs().max().clamp_min(1.0)
    return float(((got - ref).abs() / tol).max()) if got.numel() else 0.0


def _make(m: int, n: int, rms: bool, bias: bool, dtype, device, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)  # same full tensors on every rank
    x = torch.randn(m, n, generator=gen).to(device, dtype)
    z = torch.randn(m, n, generator=gen).to(device, dtype)
    w = (1 + 0.2 * torch.randn(n, generator=gen)).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(device, dtype) if bias and not rms else None
    return x, z, w, b


def _check_case(case, rank, world, device, group) -> list[str]:
    """Correctness of one case on this rank: forward in bf16, gradients in fp32. Returns failure messages."""
    name, n, gs, rms, nbg, bias = case
    errors = []
    sl = slice(rank * n // world, (rank + 1) * n // world)
    kw = dict(group=group, eps=1e-5, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms)
    x, z, w, b = _make(512, n, rms, bias, torch.bfloat16, device, 1)
    y, _, rstd = tp_gated_norm(x[:, sl], w[sl], None if b is None else b[sl], z[:, sl], **kw)
    ref, _, ref_rstd = gated_norm_reference(x, w, b, z, 1e-5, gs, nbg, rms)
    full, _, _ = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms)
    worst_ref = _ulp_check(y, ref[:, sl], torch.bfloat16)
    worst_full = _ulp_check(y, full[:, sl].double(), torch.bfloat16)
    if worst_ref > 1 or worst_full > 1:
        errors.append(f"{name}: bf16 y off by {worst_ref:.2f} (vs float64) / {worst_full:.2f} (vs 1-GPU) roundings")
    lay = shard_layout(n, n if gs is None else gs, rank, world)
    g0, g1 = lay.first_group, lay.first_group + lay.num_local_groups
    rs_err = float((rstd.double() / ref_rstd[g0 * 512:g1 * 512] - 1).abs().max())
    if rs_err > 1e-5:
        errors.append(f"{name}: rstd relative error {rs_err:.3g}")
    # gradients (fp32): autograd through the float64 reference on the full tensors
    x, z, w, b = _make(64, n, rms, bias, torch.float32, device, 2)
    dy = torch.randn(64, n, generator=torch.Generator(device="cpu").manual_seed(3)).to(device)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    r, _, _ = gated_norm_reference(leaves[0], leaves[2], leaves[3], leaves[1], 1e-5, gs, nbg, rms)
    r.backward(dy.double())
    mine = [t[..., sl].clone().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    y, _, _ = tp_gated_norm(mine[0], mine[2], mine[3], mine[1], **kw)
    y.backward(dy[:, sl])
    for label, got, want in zip(("dx", "dz", "dweight", "dbias"), mine, leaves, strict=True):
        if got is None:
            continue
        w_ = want.grad[..., sl]
        err = float((got.grad.double() - w_).abs().max()) / max(1.0, float(w_.abs().max()))
        if err > 5e-5:
            errors.append(f"{name}: {label} relative error {err:.3g}")
    return errors


def _bench_case(case, m, rank, world, device, group, iters, repeats) -> dict:
    name, n, gs, rms, nbg, bias = case
    dtype = torch.bfloat16
    sl = slice(rank * n // world, (rank + 1) * n // world)
    local = n // world
    x, z, w, b = _make(m, n, rms, bias, dtype, device, 10 + m)
    xs, zs = x[:, sl].contiguous(), z[:, sl].contiguous()
    ws, bs = w[sl].contiguous(), None if b is None else b[sl].contiguous()
    kw = dict(group=group, eps=1e-5, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms)
    lay = shard_layout(n, n if gs is None else gs, rank, world)
    row = {"case": name, "rows": m, "hidden": n, "group_size": n if gs is None else gs, "world": world,
           "path": "aligned (no comm)" if lay.aligned else "spanning (1 all_reduce)"}

    def tp_fwd():
        with torch.no_grad():
            tp_gated_norm(xs, ws, bs, zs, **kw)

    xg = xs.clone().requires_grad_()
    zg = zs.clone().requires_grad_()
    wg = ws.clone().requires_grad_()
    bg = None if bs is None else bs.clone().requires_grad_()
    dy = torch.randn_like(xs)

    def tp_fwd_bwd():
        y, _, _ = tp_gated_norm(xg, wg, bg, zg, **kw)
        y.backward(dy)

    def full_single():
        with torch.no_grad():
            gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms)

    # all_gather_single is the newer name of all_gather_into_tensor (deprecated in recent torch)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gx = torch.empty(world * m, local, dtype=dtype, device=device)  # rank-major blocks (gloo needs this shape)
    gz = torch.empty_like(gx)

    def gather_full():
        with torch.no_grad():
            all_gather(gx, xs, group=group)
            all_gather(gz, zs, group=group)
            xf = gx.view(world, m, local).permute(1, 0, 2).reshape(m, n)
            zf = gz.view(world, m, local).permute(1, 0, 2).reshape(m, n)
            y, _, _ = gatednorm.layer_norm_fwd(xf, w, b, 1e-5, z=zf, group_size=gs, norm_before_gate=nbg,
                                               is_rms_norm=rms)
            return y[:, sl]

    # the naive path is only worth timing if it is right
    with torch.no_grad():
        tp_y, _, _ = tp_gated_norm(xs, ws, bs, zs, **kw)
        full_y = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=gs, norm_before_gate=nbg,
                                          is_rms_norm=rms)[0][:, sl]
    if not torch.equal(gather_full(), full_y):
        row["warning"] = "gather+full differs from the single-GPU operator"
    # worst distance to the single-GPU output, in roundings of bf16 (<= 1: within one rounding)
    row["tp_vs_full_max_roundings"] = _ulp_check(tp_y, full_y.double(), dtype)

    c = torch.float32
    slots = lay.num_slots + 1 if not rms else 1
    stat_buf = torch.zeros(slots, max(lay.num_spanning, 1), m, dtype=c, device=device)

    def bare_all_reduce():
        dist.all_reduce(stat_buf, group=group)

    for key, fn in (("tp_fwd_us", tp_fwd), ("tp_fwd_bwd_us", tp_fwd_bwd), ("full_1gpu_fwd_us", full_single),
                    ("gather_full_fwd_us", gather_full), ("stat_all_reduce_us", bare_all_reduce)):
        if key == "stat_all_reduce_us" and lay.aligned:
            row[key] = None
            continue
        try:
            row[key] = _time_us(fn, device, group, iters, repeats)
        except torch.OutOfMemoryError:  # sizes are the same on every rank, so all ranks skip together
            row[key] = None
            torch.cuda.empty_cache()
    row["stat_buffer_bytes"] = 0 if lay.aligned else stat_buf.numel() * 4
    row["activation_bytes_per_rank"] = 2 * xs.numel() * xs.element_size()
    return row


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _ratio(row: dict, key: str) -> str:
    tp, other = row.get("tp_fwd_us"), row.get(key)
    return "-" if not tp or other is None else f"{other / tp:.2f}x"


def _print_table(rows) -> None:
    header = ("case", "rows", "path", "tp fwd", "tp fwd+bwd", "1-GPU full", "gather+full", "all_reduce",
              "full/tp", "gather/tp")
    lines = [header]
    for r in rows:
        tp = r.get("tp_fwd_us")
        lines.append((r["case"], str(r["rows"]), r["path"], _fmt(tp), _fmt(r.get("tp_fwd_bwd_us")),
                      _fmt(r.get("full_1gpu_fwd_us")), _fmt(r.get("gather_full_fwd_us")),
                      _fmt(r.get("stat_all_reduce_us")), _ratio(r, "full_1gpu_fwd_us"),
                      _ratio(r, "gather_full_fwd_us")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(times: microseconds per call, slowest rank, median of repeats)")


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def run(rank: int, world: int, local_rank: int, args) -> int:
    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout),
                            **({"device_id": device} if use_cuda else {}))
    group = dist.group.WORLD
    status = 0
    result = {
        "world": world, "device": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "gatednorm": gatednorm.__version__,
        "nccl": _nccl_version() if use_cuda else None,
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        "aligned_path_backend": gatednorm.resolve_backend(None, device),
        "checks": [], "results": [],
    }
    try:
        _log(rank, f"world {world} on {result['device']}, torch {result['torch']}, nccl {result['nccl']}, "
                   f"NCCL_NVLS_ENABLE={result['NCCL_NVLS_ENABLE']}, aligned path backend "
                   f"{result['aligned_path_backend']}")
        cases = CASES if not args.cases else [c for c in CASES if any(s in c[0] for s in args.cases)]
        failures = []
        for case in cases:
            try:
                failures += _check_case(case, rank, world, device, group)
            except Exception:
                failures.append(f"{case[0]}: {traceback.format_exc()}")
        flag = torch.tensor([len(failures)], device=device)
        dist.all_reduce(flag, group=group)
        result["checks"] = failures
        if rank == 0 or failures:
            for f in failures:
                print(f"[rank {rank}] CHECK FAILED: {f}", flush=True)
        if int(flag):
            _log(rank, f"{int(flag)} correctness check(s) failed: not timing")
            status = 1
        else:
            _log(rank, f"correctness: all {len(cases)} cases within one rounding on every rank (fwd bf16, grads fp32)")
            rows = QUICK_ROWS if args.quick else (args.rows or ROWS)
            for case in cases:
                for m in rows:
                    row = _bench_case(case, m, rank, world, device, group, args.iters, args.repeats)
                    result["results"].append(row)
                    _log(rank, f"  {case[0]} rows={m}: tp {_fmt(row['tp_fwd_us'])} us, "
                               f"1-GPU {_fmt(row['full_1gpu_fwd_us'])} us, gather {_fmt(row['gather_full_fwd_us'])} us")
            if rank == 0:
                print()
                _print_table(result["results"])
    finally:
        if rank == 0 and args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {args.out}", flush=True)
        dist.destroy_process_group()
    return status


def _spawned(local_rank: int, world: int, args) -> None:
    status = run(local_rank, world, local_rank, args)
    if status:
        sys.exit(status)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_distributed.json", help="JSON results (written by rank 0)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="*", help=f"row counts (default {ROWS})")
    p.add_argument("--cases", nargs="*", help="substrings of case names to run")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help=f"rows {QUICK_ROWS}, for a smoke test")
    p.add_argument("--timeout", type=int, default=300, help="collective timeout, seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.repeats = min(args.iters, 5), min(args.repeats, 2)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        return run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), args)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"need {args.nproc} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    try:
        mp.spawn(_spawned, args=(args.nproc, args), nprocs=args.nproc, join=True)
    except ProcessException as e:
        print(f"a worker failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
