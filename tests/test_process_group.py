"""ω normalized over a data-parallel group: 2 gloo ranks, each holding half of the batch, must
get the escort weights of the whole batch (contract: The OPO loss, norm_scope="batch" with process_group)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opo_train.distributed import free_port
from reference import escort_weights as ref_escort_weights
from reference import logprobs as ref_logprobs


def _batch():
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 6, 5, 16, 40
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, :2] = -100
    advantages = torch.randn(B, generator=g) * 2
    old = -torch.rand(B, T, generator=g) * 4
    return hidden, weight, targets, advantages, old


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from opo_kernels import escort_weights, fused_opo_loss
        hidden, weight, targets, advantages, old = _batch()
        half = slice(rank * 3, rank * 3 + 3)
        for normalize in ("zscore", "center"):
            w = escort_weights(advantages[half], normalize=normalize, process_group=dist.group.WORLD)
            h = hidden[half].clone().requires_grad_()
            loss, m = fused_opo_loss(h, weight, targets[half], advantages[half], old[half],
                                     normalize=normalize, process_group=dist.group.WORLD,
                                     backend="torch")
            loss.backward()
            torch.save({"omega": w, "loss": loss.detach(), "grad": h.grad},
                       f"{out}/{normalize}-rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (else an abort at exit)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("pg")
    try:
        mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException as e:
        # gloo can abort a rank at exit when its peer closes the connection first, after every
        # collective is done; tolerated only when every rank wrote all its results before the
        # final barrier (a failure during the work leaves a file missing, or raises otherwise).
        files = [out / f"{n}-rank{r}.pt" for n in ("zscore", "center") for r in range(2)]
        if e.signal_name != "SIGABRT" or not all(f.exists() for f in files):
            raise
    return out


@pytest.mark.slow
@pytest.mark.parametrize("normalize", ["zscore", "center"])
def test_omega_over_process_group_equals_whole_batch(ranks_out, normalize):
    hidden, weight, targets, advantages, old = _batch()
    omega = ref_escort_weights(advantages, normalize=normalize)
    for rank in range(2):
        got = torch.load(ranks_out / f"{normalize}-rank{rank}.pt")
        half = slice(rank * 3, rank * 3 + 3)
        torch.testing.assert_close(got["omega"].double(), omega[half], rtol=1e-5, atol=1e-6)
        # Each rank's loss: its own sequences' mean, with ω of the whole batch.
        h = hidden[half].double().requires_grad_()
        logp, _ = ref_logprobs(h, weight, targets[half])
        mask = (targets[half] != -100).double()
        delta = ((logp - old[half].double()) * mask).sum(1) / mask.sum(1)
        ref = (-omega[half] * delta + 0.5 * delta ** 2).mean()
        ref.backward()
        torch.testing.assert_close(got["loss"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad"].double(), h.grad, rtol=1e-4, atol=1e-6)
