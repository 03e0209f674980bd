"""The LM head split along the vocabulary over gloo ranks equals the whole head in one process.

Each world size is one spawn of ranks that run every case and save their results; the test
process computes the same cases with the whole head and compares. The two differ only in the
order of fp32 sums (each shard's log-sum-exp, then their combination; the hidden-state gradient
summed shard by shard), so the tolerance is the fp32 error bound of that computation, derived per
element from float64 values of the same batch (see ``_bounds``).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opo_train.distributed import free_port
from reference import make_batch, native_available

V, H = 41, 16
# Uneven shards (V is not divisible by the group size), explicit rows per rank.
SIZES = {2: [17, 24], 4: [5, 13, 9, 14]}
LOSSES = ("opo", "grpo", "dapo", "gspo", "dr_grpo", "bnpo", "cispo", "sapo")


def _cases(world):
    cases = [dict(name=f"{loss}-torch", loss=loss, backend="torch") for loss in LOSSES]
    cases += [
        dict(name="opo-reference", loss="opo", backend="reference"),
        dict(name="opo-triton", loss="opo", backend="triton", chunk_size=16),
        dict(name="grpo-fused", loss="grpo", backend="fused"),
        dict(name="opo-terms-torch", loss="opo", backend="torch", rl=True),
        dict(name="grpo-terms-torch", loss="grpo", backend="torch", rl=True),
        dict(name="opo-packed-torch", loss="opo", backend="torch", layout="cu", chunk_size=8),
        dict(name="opo-tiled-auto", loss="opo", backend="torch", auto_rows=True),
        dict(name="opo-group-softmax", loss="opo", backend="torch", escort="group_softmax"),
        dict(name="logprobs", backend="torch", logprobs=True),
        # sequences longer than the chunk: per-token pieces, the deferred sequence scale, and
        # the recomputed sub-chunks of a sequence loss with a KL and an entropy bonus
        dict(name="grpo-long-torch", loss="grpo", backend="torch", chunk_size=3),
        dict(name="opo-long-torch", loss="opo", backend="torch", chunk_size=3),
        dict(name="gspo-long-torch", loss="gspo", backend="torch", chunk_size=3),
        dict(name="opo-long-terms-torch", loss="opo", backend="torch", chunk_size=3, rl=True),
        # the head's logit transform acts per logit: the shards' statistics combine unchanged
        dict(name="opo-softcap-torch", loss="opo", backend="torch", rl=True, softcap=1.5,
             logit_scale=3.0),
        dict(name="grpo-softcap-fused", loss="grpo", backend="fused", softcap=1.5, logit_scale=0.5),
        dict(name="logprobs-softcap", backend="torch", logprobs=True, softcap=1.5, logit_scale=3.0),
    ]
    if native_available():
        cases += [dict(name="opo-terms-native", loss="opo", backend="native", rl=True),
                  dict(name="dapo-native", loss="dapo", backend="native")]
    if world == 2:
        cases.append(dict(name="opo-dtensor", loss="opo", backend="torch", dtensor=True))
    return cases


def _batch(case):
    bt = make_batch(case.get("layout", "bt"), V=V, H=H, seed=3)
    g = torch.Generator().manual_seed(11)
    N = bt.targets.numel()
    bt.ref = (bt.old_logps.reshape(-1) + 0.1 * torch.randn(N, generator=g)).clamp(max=-1e-3)
    bt.rollout = (bt.old_logps.reshape(-1) + 0.1 * torch.randn(N, generator=g)).clamp(max=-1e-3)
    return bt


def _options(case, bt):
    o = {}
    if case.get("rl"):
        o.update(entropy_coef=0.01, beta=0.04, ref_logps=bt.ref.reshape(bt.targets.shape),
                 rollout_logps=bt.rollout.reshape(bt.targets.shape),
                 is_correction="token_truncate")
    if case.get("escort"):
        o.update(escort=case["escort"], group_size=2)
    if case.get("chunk_size"):
        o["chunk_size"] = case["chunk_size"]
    return o


def _run(case, bt, weight, bias, vocab_parallel=None):
    """loss (or log-probs) of ``bt``, and the gradient of its hidden states."""
    from opo_kernels import fused_policy_loss, linear_logprobs
    h = bt.hidden.clone().requires_grad_()
    kw = dict(bias=bias, backend=case["backend"], **bt.layout_kw)
    kw.update({k: case[k] for k in ("softcap", "logit_scale") if k in case})
    if vocab_parallel is not None:
        kw["vocab_parallel"] = vocab_parallel
    if case.get("logprobs"):
        tg = torch.where(bt.mask, bt.targets, -100)  # linear_logprobs masks by ignore_index
        lp, ent = linear_logprobs(h, weight, tg, return_entropy=True, **kw)
        out = torch.stack([lp, ent])
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    else:
        out, _ = fused_policy_loss(h, weight, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                   loss=case["loss"], **kw, **_options(case, bt))
        out.backward()
    return {"out": out.detach(), "dh": h.grad}


def _leaves(bt, rows):
    w = bt.weight[rows].clone().requires_grad_()
    b = bt.bias[rows].clone().requires_grad_()
    return w, b


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from opo_kernels import VocabParallel
        group = dist.group.WORLD
        start = sum(SIZES[world][:rank])
        rows = slice(start, start + SIZES[world][rank])
        results = {}
        for case in _cases(world):
            bt = _batch(case)
            if case.get("dtensor"):
                from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
                mesh = init_device_mesh("cpu", (world,))
                w = distribute_tensor(bt.weight.clone(), mesh, [Shard(0)]).requires_grad_()
                b = distribute_tensor(bt.bias.clone(), mesh, [Shard(0)]).requires_grad_()
                r = _run(case, bt, w, b)
                r["dw"], r["db"] = w.grad.to_local(), b.grad.to_local()
                n = w.to_local().shape[0]
                offsets = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
                dist.all_gather(offsets, torch.tensor([n]))
                s0 = sum(int(x) for x in offsets[:rank])
                r["rows"] = (s0, s0 + n)
            else:
                w, b = _leaves(bt, rows)
                vp = (VocabParallel(group) if case.get("auto_rows")
                      else VocabParallel(group, rows.start, rows.stop))
                r = _run(case, bt, w, b, vp)
                r["dw"], r["db"], r["rows"] = w.grad, b.grad, (rows.start, rows.stop)
            results[case["name"]] = r
        # Twice the same call: bitwise the same (the reduction order is fixed).
        case = _cases(world)[0]
        bt = _batch(case)
        again = [_run(case, bt, *_leaves(bt, rows), VocabParallel(group, rows.start, rows.stop))
                 for _ in range(2)]
        results["_rerun"] = again
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # every rank done before any tears gloo down
    finally:
        dist.destroy_process_group()


def spawn(worker, world, out_dir, *extra):
    """Run ``worker(rank, world, port, out_dir, *extra)`` on ``world`` gloo ranks; gloo's abort at
    exit (a peer closed first, after the final barrier) is tolerated once every rank saved."""
    try:
        mp.start_processes(worker, args=(world, free_port(), str(out_dir), *extra), nprocs=world,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not all((out_dir / f"rank{r}.pt").exists()
                                                 for r in range(world)):
            raise
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, spawn(_worker, world, tmp_path_factory.mktemp(f"vp{world}"))


def _whole(case):
    """The one-process result with the whole head."""
    bt = _batch(case)
    w, b = bt.weight.clone().requires_grad_(), bt.bias.clone().requires_grad_()
    r = _run(case, bt, w, b)
    r["dw"], r["db"] = w.grad, b.grad
    return r


U = 2.0 ** -24  # fp32 unit roundoff


def _bounds(case):
    """Per-element bounds on |sharded − whole| for out, dh, dw, db (first order in u).

    Each computation's fp32 log-sum-exp, target log-prob and entropy of token t are within
    δ_t = u·(V + 4 + 2|lse_t| + 4·max_j |s_tj|) of the exact values (the sum of V exponentials,
    the log, the additions of the max and of the target logit), so the two differ by ≤ 2δ_t.
    With g_t, e_t the loss's derivatives w.r.t. the log-prob and the entropy of token t (float64):
    out: Σ_t (|g_t| + |e_t|)·2δ_t + 8u|out|; the logit gradient dz_tj = g_t(1[j=t] − p_j) −
    e_t p_j (s_tj − lse_t + H_t) moves by |G_tj|·(2δ_t + 4u) with |G_tj| = |g_t|(1[j=t] + p_j) +
    |e_t| p_j (|s_tj − lse_t + H_t| + 1), plus the same form in the change of g and e (the
    loss's float64 |Hessian| times 2δ, and 32u of their scale for their own rounding); dh, dw, db
    are sums of V, N, N of its products with W or h, reordered: + 2·(V or N)·u·Σ|terms|.
    """
    import reference
    bt = _batch(case)
    tg = bt.targets.reshape(-1)
    hid = bt.hidden.reshape(-1, H).double()
    z = hid @ bt.weight.double().t() + bt.bias.double()
    # The head's transform s = c·tanh(scale·z / c) (or scale·z): ds/dz = fac; a rounding δ of z
    # moves s by at most scale·δ, and tanh is evaluated to a few ulps of c.
    scale, cap = case.get("logit_scale", 1.0), case.get("softcap")
    s = scale * z if cap is None else cap * torch.tanh(scale * z / cap)
    fac = torch.full_like(s, scale) if cap is None else scale * (1 - (s / cap) ** 2)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[:, None])
    ent = lse - (p * s).sum(-1)
    ok = (tg >= 0) & (tg < V)
    lp = torch.where(ok, s.gather(1, torch.where(ok, tg, 0)[:, None]).squeeze(1) - lse, 0.0)
    lp, ent = lp.detach(), ent.detach()
    N = tg.numel()
    if case.get("logprobs"):
        valid = bt.mask.reshape(-1) & (tg != -100)
        wts = torch.linspace(-1, 2, 2 * N, dtype=torch.float64).view(2, N)

        def loss_of(x):
            return (torch.stack([torch.where(valid, x[:N], 0.0), torch.where(valid, x[N:], 0.0)])
                    * wts).sum()
        out = torch.stack([torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)])
    else:
        opts = {"loss": case["loss"], **_options(case, bt)}
        opts.pop("chunk_size", None)
        if opts["loss"] == "dr_grpo":
            opts["max_completion_length"] = bt.max_len
        for k in ("ref_logps", "rollout_logps"):
            if k in opts:
                opts[k] = opts[k].reshape(-1).double()

        def loss_of(x):
            return reference.policy_loss(x[:N], bt.old_logps.reshape(-1).double(), bt.advantages,
                                         bt.valid, bt.lengths, vocab_size=V, entropy=x[N:],
                                         **opts)[0]
        out = loss_of(torch.cat([lp, ent]))
    x = torch.cat([lp, ent]).requires_grad_()
    ge = torch.autograd.grad(loss_of(x), x, allow_unused=True)[0]
    ge = torch.zeros_like(x) if ge is None else ge
    hess = torch.autograd.functional.hessian(loss_of, torch.cat([lp, ent]))
    delta = 2 * U * (V + 4 + 2 * lse.abs() + 4 * s.abs().amax(-1) + 4 * scale * z.abs().amax(-1)
                     + (8 * cap if cap is not None else 0.0))
    # The loss's derivatives move with the inputs (its Hessian) and with their own rounding.
    dge = hess.abs() @ torch.cat([delta, delta]) + 32 * U * (ge.abs() + ge.abs().max())
    ga, ea = ge[:N].abs(), ge[N:].abs()
    dga, dea = dge[:N], dge[N:]
    out = out.detach()
    if case.get("logprobs"):
        b_out = (delta.expand_as(out) + 8 * U * out.abs()).reshape(2, *bt.targets.shape)
    else:
        b_out = ((ga + ea) * delta).sum() + 8 * U * out.abs()
    onehot = torch.zeros_like(p)
    onehot[ok.nonzero().squeeze(1), tg[ok]] = 1.0
    def mag0(a, b):  # |ds-gradient| for derivative magnitudes a (log-prob) and b (entropy)
        return a[:, None] * (onehot + p) + b[:, None] * p * ((s - lse[:, None] + ent[:, None]).abs() + 1)
    G0 = mag0(ga, ea)
    G = fac * G0  # |dz|
    dz = G * (delta + 4 * U)[:, None] + fac * mag0(dga, dea)
    if cap is not None:  # fac moves with s: scale·2|s|/c²·δ, and its own rounding
        dz = dz + G0 * scale * (2 * delta[:, None] / cap + 4 * U)
    W, h = bt.weight.double().abs(), hid.abs()
    b_dh = (dz @ W + 2 * V * U * (G @ W)).reshape(bt.hidden.shape)
    b_dw = dz.t() @ h + 2 * N * U * (G.t() @ h)
    b_db = dz.sum(0) + 2 * N * U * G.sum(0)
    return {"out": b_out, "dh": b_dh, "dw": b_dw, "db": b_db}


@pytest.mark.slow
def test_every_case_equals_the_whole_head(ranks):
    world, results = ranks
    for case in _cases(world):
        want, bound = _whole(case), _bounds(case)
        for rank in range(world):
            got = results[rank][case["name"]]
            s0, s1 = got["rows"]
            for key, rows in (("out", ...), ("dh", ...), ("dw", slice(s0, s1)),
                              ("db", slice(s0, s1))):
                err = (got[key].double() - want[key][rows].double()).abs()
                tol = bound[key][rows]
                worst = (err - tol).argmax() if err.dim() else None
                assert bool((err <= tol).all()), (
                    f"{case['name']} world={world} rank={rank} {key}: |sharded − whole| = "
                    f"{err.reshape(-1)[worst] if worst is not None else err:.3g} > "
                    f"{tol.reshape(-1)[worst] if worst is not None else tol:.3g}")


@pytest.mark.slow
def test_reruns_are_bitwise_equal(ranks):
    world, results = ranks
    for rank in range(world):
        a, b = results[rank]["_rerun"]
        for k in ("out", "dh"):
            assert torch.equal(a[k], b[k]), (world, rank, k)


# ------------------------------------------------------------------------------------------------
# Data parallel × vocabulary parallel: a 2 × 2 mesh of 4 ranks against one process
# ------------------------------------------------------------------------------------------------

MESH_CASES = [dict(name="opo-mesh", loss="opo", backend="torch"),
              dict(name="grpo-mesh", loss="grpo", backend="torch", rl=True)]


def _counts(case, mask):
    """The whole batch's token / sequence counts that the case's loss divides by."""
    from opo_kernels.options import LossOptions, counts_read
    o = LossOptions(loss=case["loss"], entropy_coef=0.01 if case.get("rl") else 0.0)
    items, seqs = counts_read(o)
    return {**({"num_items_in_batch": mask.sum()} if items else {}),
            **({"num_seqs_in_batch": mask.any(-1).sum()} if seqs else {})}


def _mesh_worker(rank, world, port, out_dir):
    """dp = rank // 2 holds half of the sequences; tp = rank % 2 holds half of the vocabulary."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from opo_kernels import VocabParallel, fused_policy_loss
        # Every rank creates every group, in the same order.
        dp_groups = [dist.new_group([t, t + 2]) for t in range(2)]
        tp_groups = [dist.new_group([2 * d, 2 * d + 1]) for d in range(2)]
        dp, tp = rank // 2, rank % 2
        results = {}
        for case in MESH_CASES:
            bt = _batch(case)
            B = bt.advantages.shape[0]
            seqs = slice(dp * B // 2, (dp + 1) * B // 2)
            rows = slice(0, 17) if tp == 0 else slice(17, V)
            mask = bt.mask & (bt.targets != -100)
            opts = _options(case, bt)
            for k in ("ref_logps", "rollout_logps"):
                if k in opts:
                    opts[k] = opts[k][seqs]
            h = bt.hidden[seqs].clone().requires_grad_()
            w, b = _leaves(bt, rows)
            loss, _ = fused_policy_loss(
                h, w, bt.targets[seqs], bt.advantages[seqs], bt.old_logps[seqs], bt.mask[seqs],
                loss=case["loss"], bias=b, backend=case["backend"],
                process_group=dp_groups[tp], **_counts(case, mask),
                vocab_parallel=VocabParallel(tp_groups[dp], rows.start, rows.stop), **opts)
            loss.backward()
            results[case["name"]] = {"out": loss.detach(), "dh": h.grad, "dw": w.grad,
                                     "db": b.grad, "rows": (rows.start, rows.stop),
                                     "seqs": (seqs.start, seqs.stop)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_times_vocab_parallel_equals_one_process(tmp_path):
    results = spawn(_mesh_worker, 4, tmp_path)
    for case in MESH_CASES:
        bt = _batch(case)
        mask = bt.mask & (bt.targets != -100)
        # The whole batch in one process, with the same global counts.
        h = bt.hidden.clone().requires_grad_()
        w, b = bt.weight.clone().requires_grad_(), bt.bias.clone().requires_grad_()
        from opo_kernels import fused_policy_loss
        want, _ = fused_policy_loss(h, w, bt.targets, bt.advantages, bt.old_logps, bt.mask,
                                    loss=case["loss"], bias=b, backend=case["backend"],
                                    **_counts(case, mask), **_options(case, bt))
        want.backward()
        bound = _bounds(case)
        # The data-parallel ranks' losses and weight gradients add up to the whole batch's.
        for tp in range(2):
            ranks = [results[2 * d + tp][case["name"]] for d in range(2)]
            s0, s1 = ranks[0]["rows"]
            got = {"out": sum(r["out"] for r in ranks), "dw": sum(r["dw"] for r in ranks),
                   "db": sum(r["db"] for r in ranks)}
            for key, g, wt, tol in (("out", got["out"], want, bound["out"]),
                                    ("dw", got["dw"], w.grad[s0:s1], bound["dw"][s0:s1]),
                                    ("db", got["db"], b.grad[s0:s1], bound["db"][s0:s1])):
                err = (g.double() - wt.detach().double()).abs()
                assert bool((err <= tol).all()), (case["name"], tp, key, float((err - tol).max()))
            for r in ranks:
                q0, q1 = r["seqs"]
                err = (r["dh"].double() - h.grad[q0:q1].double()).abs()
                assert bool((err <= bound["dh"][q0:q1]).all()), (case["name"], "dh")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _bad_worker(rank, world, port, out_dir):
    """Each bad call on 2 ranks; every rank must raise (none may hang in a collective)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
        from opo_kernels import VocabParallel, linear_logprobs
        bt = make_batch("bt", V=V, H=H, seed=3, use_mask=False)
        tg = bt.targets.clamp(0, V - 1)
        group = dist.group.WORLD
        rows = slice(0, 17) if rank == 0 else slice(17, V)
        w = bt.weight[rows]
        mesh = init_device_mesh("cpu", (world,))
        calls = {
            "gap": lambda: linear_logprobs(bt.hidden, w, tg, vocab_parallel=VocabParallel(
                group, rows.start + rank, rows.stop + rank)),
            "rows_mismatch": lambda: linear_logprobs(bt.hidden, w, tg, vocab_parallel=VocabParallel(
                group, rows.start, rows.stop + 1)),
            "target_outside": lambda: linear_logprobs(bt.hidden, w, torch.full_like(tg, V),
                                                      vocab_parallel=VocabParallel(group)),
            "hidden_differs": lambda: linear_logprobs(bt.hidden + rank, w, tg,
                                                      vocab_parallel=VocabParallel(group)),
            "dtensor_dim1": lambda: linear_logprobs(
                bt.hidden, distribute_tensor(bt.weight.clone(), mesh, [Shard(1)]), tg),
            "half_rows": lambda: linear_logprobs(bt.hidden, w, tg, vocab_parallel=VocabParallel(
                group, rows.start)),
            "not_a_group": lambda: linear_logprobs(bt.hidden, w, tg,
                                                   vocab_parallel=VocabParallel("world")),
        }
        errors = {}
        for name, call in calls.items():
            try:
                call()
                errors[name] = None
            except (ValueError, TypeError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
        torch.save(errors, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


BAD = {"gap": "tile", "rows_mismatch": "stop - start", "target_outside": "targets must be in [0, V=41)",
       "hidden_differs": "different hidden states", "dtensor_dim1": "Shard(0)",
       "half_rows": "both start and stop", "not_a_group": "vocab_parallel.group"}


@pytest.mark.slow
def test_bad_input_is_refused_on_every_rank(tmp_path):
    results = spawn(_bad_worker, 2, tmp_path)
    for rank, errors in enumerate(results):
        for name, needle in BAD.items():
            assert errors[name] is not None, f"{name}: accepted on rank {rank}"
            assert needle in errors[name], (name, errors[name])


def test_vocab_parallel_argument_type():
    from opo_kernels import linear_logprobs
    bt = make_batch("bt", V=V, H=H, seed=3, use_mask=False)
    with pytest.raises(TypeError, match="vocab_parallel must be an opo_kernels.VocabParallel"):
        linear_logprobs(bt.hidden, bt.weight, bt.targets.clamp(0, V - 1), vocab_parallel=(0, 1))
