"""What the benchmark runs: shapes, input tensors, and the registry of methods.

Every method is a function ``build(inputs) -> step`` where ``step()`` runs one
forward+backward, returns the (detached) loss (None for the floor) and leaves d(loss)/d(hidden)
in ``inputs.hidden.grad`` and d(loss)/d(weight) in ``inputs.weight.grad`` (the floor leaves the
same two products in its own buffers). ``build``
raises :class:`Unavailable` with a reason when the method is not installed or cannot run on the
device; the caller reports that reason instead of dropping the method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# The paper's OPO settings (the library's defaults); the naive baseline uses the same.
ALPHA, MU, TAU = 0.4, 1.0, 1.0
PEAKED_ENTROPY = 1.5   # nats: inside the 0.5-3 band of a trained LM's softmax
FLAT_SCALE = 0.3       # logit std for "flat" inputs: entropy = log V - ~0.045 nats
OLD_NOISE = 0.05       # std of old_logps - logp (so Delta != 0 and the mu term acts)
INPUT_KINDS = ("peaked", "zipf", "flat")


class Unavailable(RuntimeError):
    """The method is not installed or cannot run on this device (the message says which)."""


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``B`` sequences of ``T`` tokens, hidden size ``H``, vocabulary ``V``."""
    B: int
    T: int
    H: int
    V: int
    dtype: str = "float32"

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"N={self.N} ({self.B}x{self.T}) H={self.H} V={self.V} {self.dtype}"


PRESETS = {
    "cpu-headline": Shape(4, 256, 512, 32000, "float32"),
    "gpu-headline": Shape(8, 1024, 4096, 151936, "bfloat16"),
    "cpu-quick": Shape(2, 128, 256, 8000, "float32"),
    "gpu-quick": Shape(2, 1024, 1024, 32000, "bfloat16"),
}

# Sweep points: N goes through B at the device's tokens per sequence; V replaces the headline's.
SWEEPS = {
    "cpu-headline": {"n": [256, 512, 1024, 2048], "v": [8000, 16000, 32000, 65536],
                     "t": [256, 2048, 8192, 16384]},
    "gpu-headline": {"n": [2048, 8192, 32768], "v": [32000, 151936, 262144]},
    "cpu-quick": {"n": [128, 256, 512], "v": [4000, 8000, 16000]},
    "gpu-quick": {"n": [1024, 2048, 4096], "v": [16000, 32000, 65536]},
}


def sweep_shapes(base: Shape, axis: str, points: list[int]) -> list[Shape]:
    """Shapes that vary ``N`` (through B, at fixed T), ``V``, or the tokens per sequence ``T``
    (B = N / T sequences, at least one: N grows past the headline's once T does)."""
    out = []
    for p in points:
        if axis == "t":
            out.append(Shape(max(1, base.N // p), p, base.H, base.V, base.dtype))
        elif axis == "n":
            if p % base.T:
                raise ValueError(f"sweep point N={p} is not a multiple of T={base.T}")
            out.append(Shape(p // base.T, base.T, base.H, base.V, base.dtype))
        elif axis == "v":
            out.append(Shape(base.B, base.T, base.H, p, base.dtype))
        else:
            raise ValueError(f"axis must be 'n', 'v' or 't', got {axis!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Fresh random tensors for one case.

    hidden (B, T, H) and weight (V, H) in the case dtype, both requiring grad; targets (B, T)
    int64 sampled from the model's own softmax (as in on-policy RL); advantages (B,) fp32
    N(0, 1); old_logps (B, T) fp32 = the targets' log-probs + N(0, OLD_NOISE^2) noise,
    reflected at 0 (:func:`perturbed_logps`).
    """
    shape: Shape
    kind: str
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor
    logit_scale: float
    entropy: float            # mean token entropy of softmax(hidden @ weight.T), nats
    target_logp: float        # mean log-prob of the sampled targets
    extra: dict = field(default_factory=dict)

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None
        self.extra.pop("floor_out", None)

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def _rows_entropy(z: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def calibrate_scale(h_sample: torch.Tensor, w: torch.Tensor, target: float) -> float:
    """Logit multiplier that puts the mean token entropy of ``h_sample`` rows at ``target``.

    Entropy falls monotonically as the logits are scaled up, so bisect on log(scale).
    """
    z = h_sample.float() @ w.float().T
    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _rows_entropy(z * math.exp(mid)).mean().item() > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def make_inputs(shape: Shape, kind: str, device: str, seed: int = 0) -> Inputs:
    """Build one case's tensors. ``kind``: "peaked" (mean entropy ~PEAKED_ENTROPY nats, like a
    trained LM), "zipf" (the same entropy, with a Zipf-like prior shared by every row: token v's
    logit gets -log rank(v), so the same tokens are rare for all rows, as in an LM's vocabulary)
    or "flat" (entropy near log V, the worst case for gradient filtering)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")
    # Drawn on the device itself (a GPU headline weight is 0.6 G numbers).
    g = torch.Generator(device=device).manual_seed(seed)
    B, T, H, V = shape.B, shape.T, shape.H, shape.V
    dtype = shape.torch_dtype
    # Unit-variance logits before scaling: h ~ N(0,1), w ~ N(0, 1/H).
    h = torch.randn(B * T, H, generator=g, device=device)
    w = torch.randn(V, H, generator=g, device=device) / math.sqrt(H)
    if kind == "zipf":
        # A constant hidden feature carries the shared prior (std ~1, like the row-specific part).
        prior = -torch.log(torch.randperm(V, generator=g, device=device).float() + 1.0)
        h[:, 0] = 1.0
        w[:, 0] = prior - prior.mean()
    if kind in ("peaked", "zipf"):
        sample = h[torch.randperm(B * T, generator=g, device=device)[: min(256, B * T)]]
        scale = calibrate_scale(sample, w, PEAKED_ENTROPY)
    else:
        scale = FLAT_SCALE
    w = w * scale
    h, w = h.to(dtype), w.to(dtype)

    # Targets sampled from the (rounded) model's softmax, chunked so N x V fp32 never exists.
    targets = torch.empty(B * T, dtype=torch.long, device=device)
    logp = torch.empty(B * T, dtype=torch.float32, device=device)
    ent = torch.empty(B * T, dtype=torch.float32, device=device)
    step = max(1, (1 << 26) // V)
    for r0 in range(0, B * T, step):
        z = h[r0:r0 + step].float() @ w.float().T
        lse = torch.logsumexp(z, -1, keepdim=True)
        p = torch.exp(z - lse)
        ent[r0:r0 + step] = (lse.squeeze(-1) - (p * z).sum(-1))
        t = torch.multinomial(p, 1, generator=g).squeeze(-1)
        targets[r0:r0 + step] = t
        logp[r0:r0 + step] = (z.gather(-1, t[:, None]) - lse).squeeze(-1)
        del z, p, lse
    old = perturbed_logps(logp, torch.randn(B * T, generator=g, device=device))
    adv = torch.randn(B, generator=g, device=device)
    return Inputs(
        shape=shape, kind=kind,
        hidden=h.view(B, T, H).requires_grad_(True),
        weight=w.contiguous().requires_grad_(True),
        targets=targets.view(B, T), advantages=adv, old_logps=old.view(B, T).contiguous(),
        logit_scale=scale, entropy=ent.mean().item(), target_logp=logp.mean().item(),
    )


# ----------------------------------------------------------------------------------------------
# The naive materializing OPO (written here, independent of opo_kernels)
# ----------------------------------------------------------------------------------------------

def naive_escort_weights(adv: torch.Tensor) -> torch.Tensor:
    """The paper-mode defaults: x = (1-alpha) A / tau, omega~ = exp(x - max x), then the z-score
    with the population std. adv (B,) -> (B,) fp32."""
    x = (1.0 - ALPHA) * adv.float() / TAU
    wt = torch.exp(x - x.max())
    return (wt - wt.mean()) / (wt.std(unbiased=False) + 1e-6)


def opo_seq_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """OPO, paper mode: logp, old (B, T) fp32 (all tokens valid), adv (B,) -> fp32 scalar.

    Delta_i = mean_t (logp - old), loss = mean_i [-omega_i Delta_i + mu/2 Delta_i^2].
    """
    delta = (logp - old).mean(-1)
    omega = naive_escort_weights(adv).detach()
    return (-omega * delta + 0.5 * MU * delta * delta).mean()


def naive_opo(hidden, weight, targets, old, adv) -> torch.Tensor:
    """logits (B, T, V) in fp32 -> log_softmax -> gather -> OPO sequence loss."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return opo_seq_loss(logp, old, adv)


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Callable[[Inputs], Callable[[], None]]
    devices: tuple = ("cpu", "cuda")
    why_not: str = ""          # reason reported on devices outside ``devices``
    warmup: int = 1            # extra warm-up runs (compilation, autotuning)


def _floor(x: Inputs):
    """z = h W^T, dh = dz W, dW = dz^T h in the case dtype, reusing z as dz (values do not
    change GEMM time); no autograd, nothing but the three GEMMs."""
    h = x.hidden.detach().reshape(-1, x.shape.H)
    w = x.weight.detach()

    def step():
        z = h @ w.T
        dh = z @ w
        dw = z.T @ h
        x.extra["floor_out"] = (dh, dw)  # keep the products alive like .grad would be
    return step


def perturbed_logps(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Log-probs near ``logp`` (fp32): logp + OLD_NOISE·noise, reflected at 0 so that every value
    stays a log-prob (≤ 0), as the losses require of their anchors."""
    return -(logp + OLD_NOISE * noise).abs()


def _opo_backend(backend: str, terms: bool = False):
    """fused_opo_loss on ``backend``; ``terms``: with an entropy bonus (entropy_coef 0.01) and
    token-level rollout IS correction (rollout log-probs: old_logps perturbed the same way)."""
    def build(x: Inputs):
        try:
            from opo_kernels import fused_opo_loss
        except ImportError as e:
            raise Unavailable(f"opo_kernels.fused_opo_loss not importable: {e}") from e
        kw = {}
        if terms:
            g = torch.Generator(device=x.old_logps.device).manual_seed(7)
            noise = torch.randn(x.old_logps.shape, generator=g, device=x.old_logps.device)
            kw = dict(entropy_coef=0.01, is_correction="token_truncate",
                      rollout_logps=perturbed_logps(x.old_logps, noise))

        def step():
            loss, _ = fused_opo_loss(x.hidden, x.weight, x.targets, x.advantages, x.old_logps,
                                     alpha=ALPHA, mu=MU, tau=TAU, backend=backend, **kw)
            loss.backward()
            return loss.detach()
        return step
    return build


# The materializing loss holds ~2.5 fp32 copies of the N x V logits at its peak (310 MiB at
# N = 1024, V = 32000: bench/results/2026-11-27-cpu-vsweep.md); on CPU it is left out above this
# many bytes of logits (the machine is shared; N = 1024 at V = 151936 is 594 MiB), and reported
# as such.
NAIVE_CPU_LOGITS_BYTES = 768 << 20


def _policy_backend(backend: str, loss: str):
    """fused_policy_loss(loss=``loss``) on ``backend`` with its default options (GRPO and GSPO:
    clip 0.2)."""
    def build(x: Inputs):
        try:
            from opo_kernels import fused_policy_loss
        except ImportError as e:
            raise Unavailable(f"opo_kernels.fused_policy_loss not importable: {e}") from e

        def step():
            loss_, _ = fused_policy_loss(x.hidden, x.weight, x.targets, x.advantages,
                                         x.old_logps, loss=loss, backend=backend)
            loss_.backward()
            return loss_.detach()
        return step
    return build


def _naive(x: Inputs):
    logits_bytes = 4 * x.shape.N * x.shape.V
    if x.hidden.device.type == "cpu" and logits_bytes > NAIVE_CPU_LOGITS_BYTES:
        raise Unavailable(f"left out: {logits_bytes / 2**30:.1f} GiB of fp32 logits "
                          f"(cap {NAIVE_CPU_LOGITS_BYTES / 2**20:.0f} MiB on CPU)")

    def step():
        loss = naive_opo(x.hidden, x.weight, x.targets, x.old_logps, x.advantages)
        loss.backward()
        return loss.detach()
    return step


_compiled_for = [None]


def _dynamo_for(shape: Shape) -> None:
    """Drop compiled graphs when the shape changes, so that sweeps never hit Dynamo's
    recompile limit and each case compiles for its own static shape (peaked and flat inputs of
    one shape share the graphs: compiling twice would only cost time)."""
    if _compiled_for[0] != shape:
        torch._dynamo.reset()
        _compiled_for[0] = shape


def _naive_compiled(x: Inputs):
    _dynamo_for(x.shape)
    fn = torch.compile(naive_opo, dynamic=False)

    def step():
        loss = fn(x.hidden, x.weight, x.targets, x.old_logps, x.advantages)
        loss.backward()
        return loss.detach()
    return step


def _liger_chunked(x: Inputs):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed: {e}") from e
    _dynamo_for(x.shape)
    # Its defaults (compiled loss math, one sequence per chunk), no KL term, GRPO clip 0.2.
    mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                   epsilon_low=0.2, epsilon_high=0.2, temperature=1.0)
    mask = torch.ones_like(x.targets)

    def step():
        out = mod(x.hidden, x.weight, x.targets, mask, x.advantages,
                  old_per_token_logps=x.old_logps)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()
    return step


def _liger_triton(x: Inputs):
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        raise Unavailable(f"liger-kernel triton_grpo_loss not importable: {e}") from e
    B, T, H = x.hidden.shape
    mask = torch.ones_like(x.targets)
    pad = torch.zeros(B, 1, H, dtype=x.hidden.dtype, device=x.hidden.device)

    def step():
        # It takes logits (B, T+1, V) and drops the last position; one padded row per sequence
        # (1/T extra GEMM work) gives it that layout from our (B, T, H) hidden states.
        logits = torch.cat([x.hidden, pad], 1) @ x.weight.T
        loss, _ = triton_grpo_loss(logits, x.old_logps, None, x.targets, x.advantages, mask,
                                   temperature=1.0, beta=0.0, eps_low=0.2, eps_high=0.2,
                                   loss_type="grpo", reduce=True)
        loss.backward()
        return loss.detach()
    return step


def _cce(x: Inputs):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable("cut-cross-entropy not installed (wheel in shared/wheels): "
                          f"{e}") from e

    # Its Triton kernels on CUDA; elsewhere its own torch.compile implementation.
    impl = "cce" if x.hidden.is_cuda else "torch_compile"

    def step():
        nll = linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none", impl=impl)
        loss = opo_seq_loss(-nll.float(), x.old_logps, x.advantages)
        loss.backward()
        return loss.detach()
    return step


def _trl_chunked(x: Inputs):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError as e:
        raise Unavailable(f"TRL's chunked_logprob (trl >= 1.16) not importable: {e}") from e
    B, T, H = x.hidden.shape

    def step():
        # TRL's fused LM head as its trainer calls it (vocabulary chunk 32768, no extra
        # outputs), then the same OPO loss on its log-probs.
        logp = ChunkedLogProbFunction.apply(x.hidden.reshape(-1, H), x.weight, None,
                                            x.targets.reshape(-1), 1.0, chunk, None, 1.0, ())[0]
        loss = opo_seq_loss(logp.view(B, T), x.old_logps, x.advantages)
        loss.backward()
        return loss.detach()
    return step


def _torch_linear_ce(x: Inputs):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    B, T, H = x.hidden.shape
    opts = torch.nn.LinearCrossEntropyOptions()  # its "auto" chunking and accumulation

    def step():
        nll = F.linear_cross_entropy(x.hidden.reshape(-1, H), x.weight, x.targets.reshape(-1),
                                     reduction="none", options=opts)
        loss = opo_seq_loss(-nll.float().view(B, T), x.old_logps, x.advantages)
        loss.backward()
        return loss.detach()
    return step


GPU_ONLY = "GPU only"
METHODS: list[Method] = [
    Method("gemm_floor", "bare LM-head GEMMs z=hW^T, dh=dzW, dW=dz^T h (torch, same dtype)",
           _floor),
    Method("opo_native", "fused_opo_loss(backend='native'): C++/OpenMP CPU op",
           _opo_backend("native"), devices=("cpu",), why_not="CPU op"),
    Method("opo_native_terms", "the same with entropy_coef=0.01 and token IS correction",
           _opo_backend("native", terms=True), devices=("cpu",), why_not="CPU op"),
    Method("gspo_native", "fused_policy_loss(loss='gspo', backend='native')",
           _policy_backend("native", "gspo"), devices=("cpu",), why_not="CPU op"),
    Method("grpo_native", "fused_policy_loss(loss='grpo', backend='native')",
           _policy_backend("native", "grpo"), devices=("cpu",), why_not="CPU op"),
    Method("opo_torch", "fused_opo_loss(backend='torch'): chunked PyTorch path",
           _opo_backend("torch")),
    Method("opo_triton", "fused_opo_loss(backend='triton'): GEMM + Triton vocabulary pass",
           _opo_backend("triton"), devices=("cuda",), warmup=2,
           why_not=GPU_ONLY + " (TRITON_INTERPRET on CPU is far too slow to time)"),
    Method("opo_fused", "fused_opo_loss(backend='fused'): fused GEMM+vocabulary Triton kernel",
           _opo_backend("fused"), devices=("cuda",), warmup=2, why_not=GPU_ONLY),
    Method("naive_opo", "logits (fp32) -> log_softmax -> gather -> OPO, eager PyTorch", _naive),
    Method("naive_opo_compile", "the same under torch.compile", _naive_compiled, warmup=2),
    Method("liger_grpo_chunked", "Liger LigerFusedLinearGRPOLoss (chunked_loss)", _liger_chunked,
           warmup=2),
    Method("liger_triton_grpo", "Liger triton_grpo_loss on materialized logits", _liger_triton,
           devices=("cuda",), warmup=2, why_not=GPU_ONLY),
    Method("cce_opo", "cut-cross-entropy linear_cross_entropy(reduction='none') log-probs + OPO "
           "(impl 'cce' on CUDA, 'torch_compile' on CPU)", _cce, warmup=2),
    Method("trl_chunked_opo", "TRL ChunkedLogProbFunction (its fused LM head) log-probs + OPO",
           _trl_chunked, warmup=2),
    Method("torch_linear_ce_opo",
           "torch F.linear_cross_entropy(reduction='none', chunked options) log-probs + OPO",
           _torch_linear_ce, warmup=2),
]
METHOD_NAMES = [m.name for m in METHODS]


def get_method(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; known: {METHOD_NAMES}")
