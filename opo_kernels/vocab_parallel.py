"""The LM head split along the vocabulary over a process group (tensor parallelism).

In Megatron's layout (``ColumnParallelLinear`` for the head, ``Shard(0)`` of a DTensor, verl's
Megatron actor, transformers' ``tp_plan``) rank ``k`` of a group holds rows ``[start_k, stop_k)``
of the ``(V, H)`` weight and every rank holds the same hidden states. The fused losses then run the
vocabulary pass on the local rows only and combine, per token, the statistics of the shards:

* forward: each rank computes its local ``(lse_k, H_k)`` (and the target's log-prob on the rank
  that owns the target); one all-reduce ``MAX`` of ``lse_k`` (1 float per token) and one ``SUM``
  of 4 floats per token give the global log-prob, log-sum-exp and entropy:
  with ``a_k = lse_k − M``, ``e_k = exp(a_k)``, ``S = Σ e_k``: ``lse = M + log S``,
  ``logp = logp_owner + a_owner − log S``, ``H = (Σ e_k H_k − Σ e_k a_k) / S + log S``;
* backward: each rank forms ``dz`` for its columns from the global ``lse`` and ``H`` (a target
  outside the shard has no one-hot term: the backend gets column 0 for it, whose one-hot term is
  taken back out, a rank-one correction of N·H flops), its weight (and bias) gradient stays
  local, and the hidden-state gradient is summed over the group (one all-reduce of H fp32 floats
  per token).

No tensor of size V ever crosses the group. The loss itself (ω, clipping, the RL terms) is
computed on every rank of the group from the same global log-probs. The chunked backends
(``triton``, ``native``, ``torch``) combine the statistics chunk by chunk inside their own pass, so
they keep its GEMM count (one pass included); ``fused`` and ``reference`` run two phases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import Backend, ChunkedBackend

__all__ = ["VocabParallel"]


@dataclass(frozen=True)
class VocabParallel:
    """A vocabulary-sharded LM head: this rank holds rows ``[start, stop)`` of the weight.

    group: the process group the vocabulary is split over (every rank of it holds the same
        hidden states and targets). ``start`` / ``stop``: this rank's rows of the global weight;
        None = the shards tile ``[0, V)`` in rank order (sizes gathered from the ranks).
    """
    group: object
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Shard:
    """A resolved shard: the group, this rank's rows and the global vocabulary size."""
    group: object
    start: int
    stop: int
    vocab_size: int


def _mesh_shard_dim(w) -> int | None:
    """The mesh dimension a DTensor weight is sharded over on dim 0 (None: replicated)."""
    from torch.distributed.tensor import Replicate, Shard as DShard
    dims = []
    for i, p in enumerate(w.placements):
        if isinstance(p, DShard) and p.dim == 0:
            dims.append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(f"weight is a DTensor with placements {tuple(w.placements)}; a "
                             "vocabulary-parallel head is Shard(0) over one mesh dimension "
                             "(Replicate elsewhere)")
    if len(dims) > 1:
        raise ValueError(f"weight is a DTensor sharded on dim 0 over {len(dims)} mesh dimensions "
                         f"{tuple(w.placements)}; shard the vocabulary over one mesh dimension")
    return dims[0] if dims else None


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_head(hidden, weight, bias, vocab_parallel):
    """``(hidden, weight, bias, group_or_None, start, stop)`` with plain local tensors.

    A DTensor weight sharded on dim 0 brings its own group; a replicated DTensor is used whole.
    ``to_local()`` keeps autograd: the local gradient flows back as the DTensor's gradient.
    """
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
        raise TypeError("vocab_parallel must be an opo_kernels.VocabParallel or None, got "
                        f"{type(vocab_parallel).__name__}")
    group = start = stop = None
    if vocab_parallel is not None:
        group, start, stop = vocab_parallel.group, vocab_parallel.start, vocab_parallel.stop
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError("vocab_parallel.group must be a torch.distributed ProcessGroup, got "
                            f"{type(group).__name__}")
        if (start is None) != (stop is None):
            raise ValueError(f"vocab_parallel: give both start and stop or neither, got start={start!r}, "
                             f"stop={stop!r}")
    if _is_dtensor(hidden):
        hidden = hidden.full_tensor()
    if _is_dtensor(bias):
        bias = bias.to_local()
    if _is_dtensor(weight):
        dim = _mesh_shard_dim(weight)
        if dim is not None:
            mesh_group = weight.device_mesh.get_group(dim)
            if group is not None and group is not mesh_group:
                raise ValueError("vocab_parallel.group differs from the group the DTensor weight is "
                                 "sharded over; pass one or the other")
            group = mesh_group
        weight = weight.to_local()
    if group is None:
        return hidden, weight, bias, None, None, None
    if start is not None:
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"vocab_parallel.{name} must be an int, got {type(v).__name__}")
    return hidden, weight, bias, group, start, stop


def resolve_shard(hidden, keep, weight, group, start, stop) -> Shard:
    """Check that the shards tile ``[0, V)`` in rank order and that the ranks agree on the hidden
    states at the valid positions (``keep`` (N,) bool); one all-gather of 6 numbers per rank (one
    host sync)."""
    V_local = weight.shape[0]
    if start is not None and stop - start != V_local:
        raise ValueError(f"vocab_parallel: stop - start = {stop - start} must equal the local weight's "
                         f"rows ({V_local})")
    world = dist.get_world_size(group)
    # A checksum of the hidden states: a rank whose hidden states differ (e.g. a data-parallel
    # group passed by mistake) makes every rank fail rather than combine unrelated rows.
    # fp32 sums of the same values in another order differ by at most 2·n·u·Σ|x| (u = 2^-24).
    h = torch.where(keep[:, None], hidden.detach(), 0).float()
    check = torch.stack([h.sum(), h.abs().sum()]).cpu().double()
    mine = torch.tensor([-1 if start is None else start, V_local, hidden.shape[0], hidden.shape[1]],
                        dtype=torch.float64)
    mine = torch.cat([mine, check]).to(_comm_device(hidden, group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).cpu().tolist()
    rank = dist.get_rank(group)
    offsets, pos = [], 0
    for r, (s, n, *_rest) in enumerate(rows):
        s, n = int(s), int(n)
        if s >= 0 and s != pos:
            raise ValueError(f"vocab_parallel: the shards must tile [0, V) in rank order; rank {r} "
                             f"starts at {s}, expected {pos} (shards {[(int(a), int(a) + int(b)) for a, b, *_ in rows]})")
        offsets.append(pos)
        pos += n
    if len({(int(x[2]), int(x[3])) for x in rows}) > 1:
        raise ValueError("vocab_parallel: the ranks of the group hold hidden states of different shapes "
                         f"{[(int(x[2]), int(x[3])) for x in rows]}; every rank needs the same hidden states")
    sums = [x[4] for x in rows]
    tol = 2 * max(1, hidden.numel()) * 2.0 ** -24 * max(x[5] for x in rows)
    if not all(abs(s - sums[0]) <= tol for s in sums):
        raise ValueError("vocab_parallel: the ranks of the group hold different hidden states "
                         f"(sums {sums}); every rank of a vocabulary-parallel group needs the same "
                         "hidden states and targets (is the group the data-parallel one?)")
    return Shard(group=group, start=offsets[rank], stop=offsets[rank] + V_local, vocab_size=pos)


def _comm_device(t: torch.Tensor, group) -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA ones."""
    backend = dist.get_backend(group)
    return t.device if backend != "gloo" else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dev = _comm_device(t, group)
    x = t if t.device == dev else t.to(dev)
    dist.all_reduce(x, op=op, group=group)
    return x if x.device == t.device else x.to(t.device)


def combine(logp_k, lse_k, ent_k, owned, group):
    """The global ``(logp, lse, entropy)`` (N,) fp32 from each shard's own; ``owned`` (N,) bool:
    whether this shard holds the row's target. One all-reduce MAX of 1 float and one SUM of 4
    floats per row."""
    M = _all_reduce(lse_k.clone(), dist.ReduceOp.MAX, group)
    a = lse_k - M
    e = torch.exp(a)
    live = e > 0  # a shard whose logits are all −inf adds nothing (not 0·inf)
    parts = torch.stack([e, torch.where(live, e * ent_k, 0.0), torch.where(live, e * a, 0.0),
                         torch.where(owned, logp_k + a, 0.0)])
    S, eH, ea, lp = _all_reduce(parts, dist.ReduceOp.SUM, group).unbind(0)
    log_s = torch.log(S)
    return lp - log_s, M + log_s, (eH - ea) / S + log_s


def shard_backend(be: Backend, shard: Shard) -> Backend:
    """``be`` on a vocabulary shard: the chunked backends keep their one pass (the statistics of
    each chunk of logits combined before its loss), the others run two phases."""
    if isinstance(be, ChunkedBackend):
        return ChunkedShardBackend(be, shard)
    return VocabParallelBackend(be, shard)


class ChunkedShardBackend(ChunkedBackend):
    """A chunked backend on a vocabulary shard. Its vocabulary pass combines the shards'
    statistics per chunk (targets of other shards are out of this shard's range: the chunked
    vocabulary passes give them no one-hot term), and the hidden-state gradient is summed over
    the group once at the end, so every path of :mod:`opo_kernels.chunked` (one pass included)
    runs unchanged."""

    def __init__(self, be: ChunkedBackend, shard: Shard):
        self.__dict__.update(be.__dict__)  # the chunk schedule and whatever else it carries
        self._forward, self._backward = self.__dict__.pop("vocab_forward"), self.__dict__.pop("vocab_backward")
        self.shard = shard

    def vocab_forward(self, logits, targets, temperature=1.0, softcap=None):
        lt = targets - self.shard.start
        owned = (lt >= 0) & (lt < logits.shape[1])
        return combine(*self._forward(logits, lt, temperature, softcap), owned, self.shard.group)

    def vocab_backward(self, logits, targets, *args, **kwargs):
        return self._backward(logits, targets - self.shard.start, *args, **kwargs)

    def _sum_dh(self, dh):
        if dh is None:
            return None
        return _all_reduce(dh.float(), dist.ReduceOp.SUM, self.shard.group).to(dh.dtype)

    def grads(self, hidden, weight, bias, targets, up, needs):
        dh, dw, db = super().grads(hidden, weight, bias, targets, up, needs)
        return self._sum_dh(dh), dw, db

    def one_pass_loss(self, hidden, weight, bias, la, needs):
        loss, sums, ent_sum, dh, dw, db = super().one_pass_loss(hidden, weight, bias, la, needs)
        return loss, sums, ent_sum, self._sum_dh(dh), dw, db


class VocabParallelBackend(Backend):
    """A backend without a separate vocabulary pass (``fused``, ``reference``) on a vocabulary
    shard, in two phases: its log-probs combined per token, then its gradients."""

    one_pass = False

    def __init__(self, inner: Backend, shard: Shard):
        super().__init__(inner.options)
        self.inner, self.shard = inner, shard
        self.name = inner.name

    def _local_targets(self, targets, V_local):
        """This shard's target columns, whether the shard owns each row's target, and the
        row-wise weight of the spurious one-hot term at column 0 of the rows it does not own."""
        lt = targets - self.shard.start
        owned = (lt >= 0) & (lt < V_local)
        # Every backend takes in-range targets only: a row whose target is in another shard is
        # given column 0, and that column's one-hot term is taken back out of the gradients.
        return torch.where(owned, lt, 0), owned

    def logprobs(self, hidden, weight, bias, targets):
        lt, owned = self._local_targets(targets, weight.shape[0])
        return combine(*self.inner.logprobs(hidden, weight, bias, lt), owned, self.shard.group)

    def grads(self, hidden, weight, bias, targets, up, needs):
        lt, owned = self._local_targets(targets, weight.shape[0])
        dh, dw, db = self.inner.grads(hidden, weight, bias, lt, up, needs)
        # The one-hot term the inner backend added at column 0 of the rows this shard does not
        # own: dz[r, 0] −= g_r · (ds/dz)[r, 0], ds/dz = 1/T, times 1 − tanh² with a softcap.
        c = torch.where(owned, 0.0, up.g_logp) / self.temperature
        if self.softcap is not None:
            z0 = hidden.float() @ weight[0].float()
            if bias is not None:
                z0 = z0 + bias[0].float()
            c = c * (1.0 - torch.tanh(z0 / self.temperature / self.softcap).square())
        if dh is not None:
            dh = dh.float() - c[:, None] * weight[0].float()
            dh = _all_reduce(dh, dist.ReduceOp.SUM, self.shard.group).to(hidden.dtype)
        if dw is not None:
            dw[0] = (dw[0].float() - c @ hidden.float()).to(dw.dtype)
        if db is not None:
            db[0] = (db[0].float() - c.sum()).to(db.dtype)
        return dh, dw, db

    def __repr__(self) -> str:
        s = self.shard
        return f"VocabParallelBackend({self.inner!r}, rows [{s.start}, {s.stop}) of {s.vocab_size})"
