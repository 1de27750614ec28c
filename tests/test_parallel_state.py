"""init_parallel on gloo ranks: group sizes/ranks match the megatron-core layout
(TP fastest, then DP, then PP), DP is the rest, and bad layouts fail clearly.
Run: pytest tests/test_parallel_state.py
"""
import pytest
import torch
import torch.distributed as dist

from dist import run_ranks
from megaent.parallel import ParallelError, init_parallel
from megaent.parallel.launch import first_slurm_host, read_launch_env


def _layout(rank, world, tp, pp):
    st = init_parallel(tp, pp)
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=st.tp_group)
    y = torch.tensor([float(rank)])
    dist.all_reduce(y, group=st.dp_group)
    return dict(tp_rank=st.tp_rank, pp_rank=st.pp_rank, dp_rank=st.dp_rank, dp=st.dp, tp_sum=x.item(),
                dp_sum=y.item(), pp_ranks=st.pp_ranks, first=st.is_first_stage, last=st.is_last_stage)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2), (1, 1)])
def test_layout_matches_reference_grid(tp, pp):
    world = 4
    out = run_ranks(_layout, world, tp, pp)
    dp = world // (tp * pp)
    for rank, o in enumerate(out):
        # Reference layout, computed by hand: rank = tp_rank + tp * (dp_rank + dp * pp_rank).
        tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        assert (o["tp_rank"], o["dp_rank"], o["pp_rank"], o["dp"]) == (tp_rank, dp_rank, pp_rank, dp)
        tp_peers = [pp_rank * tp * dp + dp_rank * tp + t for t in range(tp)]
        dp_peers = [pp_rank * tp * dp + d * tp + tp_rank for d in range(dp)]
        assert o["tp_sum"] == sum(tp_peers) and o["dp_sum"] == sum(dp_peers)
        assert o["pp_ranks"] == [p * tp * dp + dp_rank * tp + tp_rank for p in range(pp)]
        assert o["first"] == (pp_rank == 0) and o["last"] == (pp_rank == pp - 1)


def _bad(rank, world):
    with pytest.raises(ParallelError, match="not divisible by parallel.tp"):
        init_parallel(2, 2)
    return True


def test_world_not_divisible_is_clear_error():
    assert run_ranks(_bad, 2) == [True, True]


def test_launch_env_sources():
    e = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (3, 8, 1, "h", 5,
                                                                                             "torchrun")
    e = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "1234",
                         "SLURM_JOB_NODELIST": "gpu[003-004]"})
    assert (e.rank, e.world_size, e.local_rank, e.master_port, e.source) == (5, 16, 5, 21234, "slurm")
    assert e.master_addr == "gpu003"
    assert read_launch_env({}).source == "single"
    assert first_slurm_host("node7,node8") == "node7"
    assert first_slurm_host("a[10,12-14]") == "a10"
