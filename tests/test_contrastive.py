"""CAV-MAE's inter-modal contrastive term against a direct computation, one process and two (gloo), and the
recall@k of paired embeddings against hand-built cases."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maeframe.engine.recall import match_ranks, recall_at
from maeframe_plugins.contrastive import info_nce


def direct_nce(queries, keys, temperature):
    """-mean_i log(exp(cos(q_i, k_i)/T) / sum_j exp(cos(q_i, k_j)/T)), written out."""
    total = 0.0
    for i, q in enumerate(queries):
        sims = [torch.dot(q, k).item() / (q.norm().item() * k.norm().item()) / temperature for k in keys]
        total -= sims[i] - math.log(sum(math.exp(s) for s in sims))
    return total / len(queries)


def test_info_nce_matches_the_direct_computation():
    torch.manual_seed(0)
    audio, visual = torch.randn(6, 5), torch.randn(6, 5)
    audio_queries, visual_queries = info_nce(audio, visual, 0.05)
    assert audio_queries.item() == pytest.approx(direct_nce(audio, visual, 0.05), rel=1e-5)
    assert visual_queries.item() == pytest.approx(direct_nce(visual, audio, 0.05), rel=1e-5)
    # perfectly paired, well separated rows give a loss near 0; swapping the pairs a large one
    eye = torch.eye(4) * 3
    assert info_nce(eye, eye, 0.05)[0].item() < 1e-6
    assert info_nce(eye, eye.flip(0), 0.05)[0].item() > 10


def _two_ranks(rank, init_file, audio, visual, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = slice(rank * 4, rank * 4 + 4)
    a, v = audio[rows].clone().requires_grad_(), visual[rows].clone().requires_grad_()
    first, second = info_nce(a, v, 0.05)
    (first + second).backward()
    out[rank] = {"loss": (first + second).item(), "grad_a": a.grad, "grad_v": v.grad}
    dist.destroy_process_group()


def test_two_processes_see_the_global_batch(tmp_path):
    """2 gloo processes with 4 rows each: the same loss as one process with the 8 rows, and each process's
    gradient is 2× (world size) its rows' gradient there, which the data-parallel average halves."""
    torch.manual_seed(1)
    audio, visual = torch.randn(8, 3), torch.randn(8, 3)
    a, v = audio.clone().requires_grad_(), visual.clone().requires_grad_()
    first, second = info_nce(a, v, 0.05)
    (first + second).backward()
    out = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), audio, visual, out), nprocs=2, join=True)
    for rank in range(2):
        rows = slice(rank * 4, rank * 4 + 4)
        assert out[rank]["loss"] == pytest.approx((first + second).item(), rel=1e-5)
        torch.testing.assert_close(out[rank]["grad_a"] / 2, a.grad[rows])
        torch.testing.assert_close(out[rank]["grad_v"] / 2, v.grad[rows])


def test_recall_at_k_on_hand_built_embeddings():
    keys = torch.eye(4)
    # query 0 matches key 0; query 1 is closest to key 2, then key 1; query 2 points at key 0 only (match
    # orthogonal, tied with keys 1 and 3: ties count against it -> rank 4); query 3 matches key 3
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert match_ranks(queries, keys).tolist() == [1, 2, 4, 1]
    assert recall_at(queries, keys, (1, 2, 3)) == {"R@1": 0.5, "R@2": 0.75, "R@3": 0.75}
    with pytest.raises(ValueError, match="must both be"):
        match_ranks(queries, keys[:3])
