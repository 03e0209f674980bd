"""The Triton vocabulary pass against a float64 PyTorch reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small;
``block_v`` forces several blocks per row so the online rescaling and the tail mask are exercised.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from opo_kernels import vocab_triton


def ref_forward(logits, targets, temperature=1.0):
    """float64 (logp, lse, entropy) of s = logits / temperature; out-of-range target -> logp 0."""
    s = logits.double() / temperature
    V = s.shape[-1]
    lse = torch.logsumexp(s, dim=-1)
    logq = s - lse[:, None]
    p = logq.exp()
    # p * log p -> 0 where p == 0 (columns at -inf), as in the definition of entropy.
    entropy = -torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)
    valid = (targets >= 0) & (targets < V)
    tgt = s.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    logp = torch.where(valid, tgt - lse, torch.zeros_like(lse))
    return logp, lse, entropy


def ref_backward(logits, targets, grad_logp, grad_entropy=None, temperature=1.0):
    """float64 d/dlogits of sum(g * (s[target] - lse) + g_ent * entropy), by autograd.

    A row whose target is out of range has no one-hot term but keeps the -g * p term (the
    contract's formula with onehot = 0), i.e. its objective is -g * lse.
    """
    x = logits.detach().double().requires_grad_(True)
    s = x / temperature
    V = s.shape[-1]
    lse = torch.logsumexp(s, dim=-1)
    valid = (targets >= 0) & (targets < V)
    tgt = s.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    obj = (grad_logp.double() * (torch.where(valid, tgt, torch.zeros_like(tgt)) - lse)).sum()
    if grad_entropy is not None:
        logq = torch.log_softmax(s, dim=-1)
        entropy = -(logq.exp() * logq).sum(-1)
        obj = obj + (grad_entropy.double() * entropy).sum()
    obj.backward()
    return x.grad


def make(n, V, device, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (n,), generator=g)
    return logits.to(device), targets.to(device)


def close(actual, expected, rtol=1e-6, atol=2e-5):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("V,block_v", [(1, None), (7, None), (130, 64), (1000, None), (1000, 128)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_forward_matches_float64(device, V, block_v, temperature):
    logits, targets = make(9, V, device)
    targets[2] = -100
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, temperature, block_v=block_v)
    assert logp.dtype == lse.dtype == entropy.dtype == torch.float32
    r_logp, r_lse, r_ent = ref_forward(logits.cpu(), targets.cpu(), temperature)
    close(logp, r_logp)
    close(lse, r_lse)
    close(entropy, r_ent)
    assert logp[2].item() == 0.0


@pytest.mark.parametrize("V,block_v", [(7, None), (130, 64), (1000, 128)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_backward_matches_float64(device, V, block_v, temperature, with_entropy):
    logits, targets = make(8, V, device, seed=1)
    targets[3] = -100
    targets[5] = V  # out of range on the other side: also no one-hot term
    g = torch.randn(8, generator=torch.Generator().manual_seed(2)).to(device)
    ge = torch.randn(8, generator=torch.Generator().manual_seed(3)).to(device) if with_entropy else None
    _, lse, entropy = vocab_triton.vocab_forward(logits, targets, temperature, block_v=block_v)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy if with_entropy else None, g, ge,
                                     temperature, block_v=block_v)
    assert dz.shape == logits.shape and dz.dtype == logits.dtype
    expected = ref_backward(logits.cpu(), targets.cpu(), g.cpu(), None if ge is None else ge.cpu(),
                            temperature)
    close(dz, expected, atol=1e-5)


def test_all_rows_ignored(device):
    logits, _ = make(6, 130, device)
    targets = torch.full((6,), -100, device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, block_v=64)
    assert torch.equal(logp.cpu(), torch.zeros(6))
    r_logp, r_lse, r_ent = ref_forward(logits.cpu(), targets.cpu())
    close(lse, r_lse)
    close(entropy, r_ent)
    zeros = torch.zeros(6, device=device)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, zeros, zeros, block_v=64)
    assert torch.isfinite(dz).all()
    assert not dz.cpu().any()


def test_mixed_ignored_rows_zero_grad(device):
    """What a loss passes: zero gradient on ignored rows -> exactly zero rows of dz."""
    logits, targets = make(7, 130, device, seed=4)
    ignored = torch.tensor([True, False, False, True, False, True, False], device=device)
    targets = torch.where(ignored, torch.full_like(targets, -100), targets)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, block_v=32)
    assert not logp[ignored].cpu().any()
    close(logp, ref_forward(logits.cpu(), targets.cpu())[0])
    g = torch.where(ignored, 0.0, 1.5).to(device)
    ge = torch.where(ignored, 0.0, -0.3).to(device)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, g, ge, block_v=32)
    assert not dz[ignored].cpu().any()
    close(dz, ref_backward(logits.cpu(), targets.cpu(), g.cpu(), ge.cpu()), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_upcast(device, dtype):
    logits, targets = make(6, 130, device, scale=8.0, dtype=dtype, seed=5)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, 0.7, block_v=64)
    # The reference sees exactly the rounded values the kernel reads: only fp32 accumulation differs.
    r_logp, r_lse, r_ent = ref_forward(logits.cpu().double(), targets.cpu(), 0.7)
    close(logp, r_logp)
    close(lse, r_lse)
    close(entropy, r_ent)
    g = torch.linspace(-1, 1, 6, device=device)
    ge = torch.linspace(0.5, -0.5, 6, device=device)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, g, ge, 0.7, block_v=64)
    assert dz.dtype == dtype
    expected = ref_backward(logits.cpu().double(), targets.cpu(), g.cpu(), ge.cpu(), 0.7)
    # dz is computed in fp32 and rounded once on store.
    eps = torch.finfo(dtype).eps
    close(dz, expected, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place(device, dtype):
    logits, targets = make(5, 130, device, dtype=dtype, seed=6)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, 1.3, block_v=64)
    g = torch.full((5,), 0.7, device=device)
    ge = torch.full((5,), -0.2, device=device)
    separate = vocab_triton.vocab_backward(logits, targets, lse, entropy, g, ge, 1.3, block_v=64)
    buf = logits.clone()
    ret = vocab_triton.vocab_backward(buf, targets, lse, entropy, g, ge, 1.3, out=buf, block_v=64)
    assert ret is buf
    assert torch.equal(buf, separate)


def test_strided_rows(device):
    """Rows of a wider buffer (stride(0) != V) and every other row of it; the rest untouched."""
    V = 130
    wide, _ = make(12, V + 37, device, seed=7)
    view = wide[::2, 5:5 + V]
    assert view.stride() == (2 * (V + 37), 1)
    targets = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(8)).to(device)
    logp, lse, entropy = vocab_triton.vocab_forward(view, targets, 0.7, block_v=64)
    r_logp, r_lse, r_ent = ref_forward(view.cpu(), targets.cpu(), 0.7)
    close(logp, r_logp)
    close(lse, r_lse)
    close(entropy, r_ent)

    g = torch.randn(6, generator=torch.Generator().manual_seed(9)).to(device)
    expected = ref_backward(view.cpu(), targets.cpu(), g.cpu(), None, 0.7)
    before = wide.clone()
    vocab_triton.vocab_backward(view, targets, lse, None, g, None, 0.7, out=view, block_v=64)
    close(view, expected, atol=1e-5)
    untouched = torch.ones_like(wide, dtype=torch.bool)
    untouched[::2, 5:5 + V] = False
    assert torch.equal(wide[untouched], before[untouched])


def test_last_dim_not_contiguous(device):
    """A transposed view is copied for reading; a transposed ``out`` is written through."""
    base, _ = make(130, 5, device, seed=10)
    logits = base.t()
    targets = torch.tensor([0, 129, 64, -100, 3], device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets)
    r_logp, r_lse, r_ent = ref_forward(logits.cpu(), targets.cpu())
    close(logp, r_logp)
    close(lse, r_lse)
    g = torch.ones(5, device=device)
    expected = ref_backward(logits.cpu(), targets.cpu(), g.cpu())
    ret = vocab_triton.vocab_backward(logits, targets, lse, None, g, None, out=logits)
    assert ret is logits
    close(base.t(), expected, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_logits_no_overflow(device, temperature):
    V = 200
    g = torch.Generator().manual_seed(11)
    logits = torch.where(torch.rand(4, V, generator=g) < 0.5, 80.0, -80.0)
    logits += torch.randn(4, V, generator=g)  # ties broken a little
    logits[1] = -80.0
    logits[1, 17] = 80.0  # one dominant column: entropy ~ 0
    logits = logits.to(device)
    targets = torch.tensor([3, 17, 150, 199], device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, temperature, block_v=64)
    for t in (logp, lse, entropy):
        assert torch.isfinite(t).all()
    r_logp, r_lse, r_ent = ref_forward(logits.cpu(), targets.cpu(), temperature)
    close(logp, r_logp)
    close(lse, r_lse)
    close(entropy, r_ent)
    gl = torch.ones(4, device=device)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, gl, gl, temperature, block_v=64)
    assert torch.isfinite(dz).all()
    # |s| reaches 80 / 0.7: s - lse carries an fp32 rounding of ~|s| * 2^-24 (8e-6 on the GPU's
    # fast exp path), so dz at the dominant column (exactly 0 in fp64) is off by that much.
    atol = 1e-5 + 2 * float(logits.abs().max()) / temperature * 2.0 ** -24
    close(dz, ref_backward(logits.cpu(), targets.cpu(), gl.cpu(), gl.cpu(), temperature), atol=atol)


def test_minus_inf_columns(device):
    """Columns masked to -inf (vocabulary padding) carry no mass and produce no NaN."""
    logits, targets = make(3, 100, device, seed=12)
    logits[:, :40] = float("-inf")  # the whole first block of row 0..2
    logits[1, 90:] = float("-inf")
    targets = torch.tensor([50, 60, 99], device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets, block_v=32)
    r_logp, r_lse, r_ent = ref_forward(logits.cpu(), targets.cpu())
    close(lse, r_lse)
    close(entropy, r_ent)
    close(logp[:2], r_logp[:2])
    g = torch.ones(3, device=device)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, g, g, block_v=32)
    assert torch.isfinite(dz).all()
    assert not dz[:, :40].cpu().any()


def test_forward_deterministic_and_batch_independent(device):
    logits, targets = make(16, 1000, device, seed=13)
    targets[4] = -100
    first = vocab_triton.vocab_forward(logits, targets, 0.7)
    second = vocab_triton.vocab_forward(logits, targets, 0.7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Rows computed in a different batch (other rows, other count) come out bit for bit the same.
    sub = vocab_triton.vocab_forward(logits[5:8].clone(), targets[5:8], 0.7)
    for a, b in zip(first, sub):
        assert torch.equal(a[5:8], b)


def test_empty_batch(device):
    logits = torch.zeros(0, 10, device=device)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(logits, targets)
    assert logp.shape == lse.shape == entropy.shape == (0,)
    dz = vocab_triton.vocab_backward(logits, targets, lse, entropy, lse, lse)
    assert dz.shape == (0, 10)


def test_int32_targets(device):
    logits, targets = make(4, 130, device, seed=14)
    got = vocab_triton.vocab_forward(logits, targets.to(torch.int32), block_v=64)
    want = vocab_triton.vocab_forward(logits, targets, block_v=64)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_input_is_refused_at_the_public_boundary(device):
    # The launchers check nothing (they run once per chunk); every rule they relied on is checked
    # by the public functions, with backend="triton" as with any other.
    from opo_kernels import linear_logprobs
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.randint(0, 10, (4,), device=device)

    def call(h=h, w=w, t=t, **kw):
        return linear_logprobs(h, w, t, backend="triton", **kw)
    with pytest.raises(ValueError, match="hidden"):
        call(h=h[0])
    with pytest.raises(TypeError, match="hidden"):
        call(h=h.double(), w=w.double())
    with pytest.raises(ValueError, match="weight"):
        call(w=w[:0])
    with pytest.raises(ValueError, match="targets"):
        call(t=t[:3])
    with pytest.raises(TypeError, match="targets"):
        call(t=t.float())
    with pytest.raises(ValueError, match="targets"):
        call(t=torch.full_like(t, 10))
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=float("nan"))
    # block_v is the launcher's own knob (no public function takes it): checked where it is read.
    logits, targets = make(4, 10, device)
    with pytest.raises(ValueError, match="block_v"):
        vocab_triton.vocab_forward(logits, targets, block_v=48)


# Rows 2^30 + 64 elements apart: row 2 starts past 2^31, where a 32-bit row offset wraps. Run in a
# child process because a wrapped offset is a wild read (a crash, not a failure).
_INT64_SCRIPT = textwrap.dedent("""
    import sys, torch
    from opo_kernels import vocab_triton
    device = sys.argv[1]
    V, stride = 40, 2**30 + 64
    try:
        # fp16, 4 GiB; on CPU only the pages touched below become resident.
        base = torch.empty(2 * stride + V, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        sys.exit(77)
    x = base.as_strided((3, V), (stride, 1))
    vals = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).half()
    x.copy_(vals.to(device))
    targets = torch.tensor([1, 5, 39], device=device)
    logp, lse, entropy = vocab_triton.vocab_forward(x, targets, block_v=16)
    s = vals.double()
    ref_lse = s.logsumexp(-1)
    ref_logp = s.gather(-1, targets.cpu()[:, None]).squeeze(-1) - ref_lse
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=1e-5), (lse, ref_lse)
    assert torch.allclose(logp.cpu().double(), ref_logp, atol=1e-5), (logp, ref_logp)
    g = torch.ones(3, device=device)
    vocab_triton.vocab_backward(x, targets, lse, None, g, None, out=x, block_v=16)
    p = (s - ref_lse[:, None]).exp()
    ref_dz = torch.nn.functional.one_hot(targets.cpu(), V).double() - p
    assert torch.allclose(x.cpu().double(), ref_dz, atol=2e-3), (x, ref_dz)
    print("ok")
""")


def test_int64_row_offsets(device):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, device], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 77:
        pytest.skip("could not reserve a 4 GiB buffer")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("ok")
