"""The tensor-parallel modules check their arguments at construction, as the single-device modules do.

Built with explicit ``rank``/``world_size`` (no process group needed: the constructor never consults one
then), every bad argument must raise the single-device module's own exception type and message, naming the
argument, at construction rather than at the first forward. Without a process group and without the
overrides, argument errors still come first (not the "torch.distributed is not initialized" error).
"""

from __future__ import annotations

import pytest
import torch

import gatednorm
from gatednorm.distributed import TPGatedLayerNorm, TPGatedRMSNorm

HIDDEN = 96
WORLD = 2

# (keyword arguments on top of hidden_size=HIDDEN, the argument the message must name)
BAD = [
    ({"hidden_size": 96.0}, "hidden_size"),
    ({"hidden_size": True}, "hidden_size"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"eps": -1e-5}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"eps": "1e-5"}, "eps"),
    ({"group_size": 7}, "group_size"),
    ({"group_size": 32.0}, "group_size"),
    ({"group_size": 0}, "group_size"),
    ({"norm_before_gate": 1}, "norm_before_gate"),
    ({"norm_before_gate": "yes"}, "norm_before_gate"),
    ({"activation": "relu"}, "activation"),
    ({"activation": None}, "activation"),
    ({"backend": "no-such-backend"}, "backend"),
]

PAIRS = [(TPGatedLayerNorm, gatednorm.LayerNorm), (TPGatedRMSNorm, gatednorm.RMSNorm)]


def _single_device_error(single_cls, kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        single_cls(**{"hidden_size": HIDDEN, **kwargs})
    return info.value


@pytest.mark.parametrize(("tp_cls", "single_cls"), PAIRS, ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize(("kwargs", "word"), BAD, ids=[f"{next(iter(k))}={v!r}" for k, v in
                                                        ((k, next(iter(k.values()))) for k, _ in BAD)])
@pytest.mark.parametrize("with_rank", [True, False], ids=["rank-given", "no-group"])
def test_tp_modules_reject_what_single_device_modules_reject(tp_cls, single_cls, kwargs, word, with_rank):
    expected = _single_device_error(single_cls, kwargs)
    assert word in str(expected)
    extra = {"rank": 1, "world_size": WORLD} if with_rank else {}
    assert not torch.distributed.is_initialized()
    with pytest.raises(type(expected)) as info:
        tp_cls(**{"hidden_size": HIDDEN, **kwargs, **extra})
    assert str(info.value) == str(expected)


@pytest.mark.parametrize("tp_cls", [TPGatedLayerNorm, TPGatedRMSNorm], ids=["layernorm", "rmsnorm"])
def test_tp_modules_check_rank_and_world_size(tp_cls):
    for kwargs, exc, word in [
        ({"rank": 1.0, "world_size": WORLD}, TypeError, "rank"),
        ({"rank": True, "world_size": WORLD}, TypeError, "rank"),
        ({"rank": 0, "world_size": "2"}, TypeError, "world_size"),
        ({"rank": WORLD, "world_size": WORLD}, ValueError, "rank"),
        ({"rank": 0, "world_size": 5}, ValueError, "hidden size"),  # 96 is not a multiple of 5
    ]:
        with pytest.raises(exc, match=word):
            tp_cls(HIDDEN, **kwargs)


@pytest.mark.parametrize("tp_cls", [TPGatedLayerNorm, TPGatedRMSNorm], ids=["layernorm", "rmsnorm"])
def test_tp_modules_accept_valid_arguments(tp_cls):
    """Valid arguments (drawn at random) still build a module with the rank's shard of the parameters."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    world = [1, 2, 4][int(torch.randint(0, 3, (), generator=gen))]
    rank = int(torch.randint(0, world, (), generator=gen))
    group_size = [None, 12, 16, 32, 48][int(torch.randint(0, 5, (), generator=gen))]
    eps = float(torch.rand((), generator=gen)) * 1e-3
    mod = tp_cls(HIDDEN, eps=eps, group_size=group_size, norm_before_gate=False, rank=rank, world_size=world,
                 activation="silu", backend="native", dtype=torch.float64)
    assert mod.weight.shape == (HIDDEN // world,) and mod.weight.dtype == torch.float64
    assert (mod.bias is None) == (tp_cls is TPGatedRMSNorm)
    assert mod.eps == eps and mod.activation == "swish" and (mod.tp_rank, mod.tp_size) == (rank, world)
