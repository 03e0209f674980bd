"""The native CPU vocabulary pass (``opo_kernels.native``, ``csrc/vocab_pass.cpp``) against a
float64 PyTorch reference written here: forward (logp, lse, entropy) and backward (dz, checked
against float64 autograd of ``sum(g * logp + g_ent * entropy)``), plus the build fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from opo_kernels import native

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _native():
    if not native.available():
        pytest.skip("native CPU vocabulary pass could not be built here")


# ---- float64 reference ------------------------------------------------------------------------

def ref_forward(logits, targets, temperature=1.0):
    """(logp, lse, entropy) in float64 of logits (n, V); out-of-range targets give logp 0."""
    s = logits.double() / temperature
    V = s.shape[1]
    lse = torch.logsumexp(s, dim=1)
    p = torch.exp(s - lse[:, None])
    # p = 0 where s = -inf: that term of sum(p s) is 0, not NaN.
    ps = torch.where(p > 0, p * s, torch.zeros_like(s))
    entropy = lse - ps.sum(1)
    valid = (targets >= 0) & (targets < V)
    idx = torch.where(valid, targets, 0)
    logp = torch.where(valid, s.gather(1, idx[:, None])[:, 0] - lse, torch.zeros_like(lse))
    return logp, lse, entropy


def ref_grad(logits, targets, grad_logp, grad_entropy, temperature=1.0):
    """d/dlogits of sum(g * logp + g_ent * entropy) by float64 autograd.

    The contract gives rows with an out-of-range target dz = -g p (no one-hot term), i.e. the
    gradient of g * (-lse): callers zero g there when they want nothing to flow back."""
    z = logits.detach().double().requires_grad_(True)
    logp, lse, entropy = ref_forward(z, targets, temperature)
    valid = (targets >= 0) & (targets < logits.shape[1])
    logp = torch.where(valid, logp, -lse)
    loss = (grad_logp.double() * logp).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * entropy).sum()
    (dz,) = torch.autograd.grad(loss, z)
    return dz


def make(n, V, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    if n > 2:
        targets[1] = -100  # ignore_index
        targets[2] = V  # just out of range
    g = torch.randn(n, generator=gen)
    ge = torch.randn(n, generator=gen)
    return logits, targets, g, ge


def assert_close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ---- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 7, 16, 33, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_fp32(V, temperature):
    logits, targets, _, _ = make(12, V)
    logp, lse, ent = native.vocab_forward(logits, targets, temperature)
    assert logp.dtype == lse.dtype == ent.dtype == torch.float32 and logp.shape == (12,)
    r_logp, r_lse, r_ent = ref_forward(logits, targets, temperature)
    assert_close(lse, r_lse, atol=2e-5, rtol=2e-6)
    assert_close(logp, r_logp, atol=2e-5, rtol=2e-6)
    assert_close(ent, r_ent, atol=2e-5, rtol=2e-6)
    assert logp[1] == 0 and logp[2] == 0  # ignored / out-of-range targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision_inputs(dtype):
    logits, targets, _, _ = make(16, 1003, dtype)
    out = native.vocab_forward(logits, targets, 1.3)
    # The reference sees the same rounded inputs; the arithmetic must still be fp32-accurate.
    for got, want in zip(out, ref_forward(logits, targets, 1.3)):
        assert got.dtype == torch.float32
        assert_close(got, want, atol=2e-5, rtol=2e-6)


def test_forward_strided_rows_and_columns():
    logits, targets, _, _ = make(9, 517)
    wide = torch.randn(9, 517 + 13)
    wide[:, 5:522] = logits
    rows = wide[:, 5:522]  # row stride 530, last dim contiguous
    assert rows.stride() == (530, 1)
    want = ref_forward(logits, targets)
    for got, w in zip(native.vocab_forward(rows, targets), want):
        assert_close(got, w, atol=2e-5, rtol=2e-6)
    cols = logits.t().contiguous().t()  # last dim not contiguous: copied inside
    for got, w in zip(native.vocab_forward(cols, targets), want):
        assert_close(got, w, atol=2e-5, rtol=2e-6)


def test_forward_masked_logits_and_empty():
    logits, targets, _, _ = make(6, 300)
    logits[:, 100:200] = float("-inf")
    targets[0] = 150  # a target on a masked logit has logp -inf
    logp, lse, ent = native.vocab_forward(logits, targets)
    r_logp, r_lse, r_ent = ref_forward(logits, targets)
    assert torch.isfinite(lse).all() and torch.isfinite(ent).all()
    assert_close(lse, r_lse, atol=2e-5, rtol=2e-6)
    assert_close(ent, r_ent, atol=2e-5, rtol=2e-6)
    assert logp[0] == float("-inf")
    assert_close(logp[1:], r_logp[1:], atol=2e-5, rtol=2e-6)

    empty = native.vocab_forward(torch.empty(0, 50), torch.empty(0, dtype=torch.long))
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in empty)


def test_forward_max_found_late_in_the_row():
    # The forward is an online softmax over 512-element blocks: the running max grows in every
    # block (row 0), leading blocks are all masked (row 1), the max sits in the tail (row 2).
    V = 2003
    logits, targets, _, _ = make(3, V, scale=1.0)
    logits[0] += torch.linspace(0, 40, V)
    logits[1, :1100] = float("-inf")
    logits[2, -1] = 30.0
    targets = torch.tensor([V - 1, 1500, V - 1])
    for got, want in zip(native.vocab_forward(logits, targets), ref_forward(logits, targets)):
        assert_close(got, want, atol=2e-5, rtol=2e-6)


def test_forward_large_logits_no_overflow():
    logits, targets, _, _ = make(4, 257, scale=1.0)
    logits = logits * 50 + 1e4  # exp(1e4) overflows; the max shift must prevent it
    for got, want in zip(native.vocab_forward(logits, targets), ref_forward(logits, targets)):
        assert_close(got, want, atol=5e-3, rtol=1e-6)  # lse ~ 1e4: fp32 spacing ~1e-3


def test_deterministic_and_independent_of_batch_and_threads():
    logits, targets, g, ge = make(40, 2051)
    a = native.vocab_forward(logits, targets, 0.9)
    b = native.vocab_forward(logits.clone(), targets, 0.9)
    alone = native.vocab_forward(logits[17:18].clone(), targets[17:18], 0.9)
    n_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.vocab_forward(logits, targets, 0.9)
        d1 = native.vocab_backward(logits, targets, a[1], a[2], g, ge, 0.9)
    finally:
        torch.set_num_threads(n_threads)
    d2 = native.vocab_backward(logits, targets, a[1], a[2], g, ge, 0.9)
    for x, y, z, w in zip(a, b, one, alone):
        assert torch.equal(x, y) and torch.equal(x, z) and torch.equal(x[17:18], w)
    assert torch.equal(d1, d2)


# ---- backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [5, 16, 1000, 4099])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_backward_fp32(V, with_entropy, temperature):
    logits, targets, g, ge = make(10, V)
    _, lse, ent = native.vocab_forward(logits, targets, temperature)
    grad_ent = ge if with_entropy else None
    dz = native.vocab_backward(logits, targets, lse, ent, g, grad_ent, temperature)
    assert dz.dtype == torch.float32 and dz.shape == logits.shape
    want = ref_grad(logits, targets, g, grad_ent, temperature)
    assert_close(dz, want, atol=1e-5, rtol=2e-5)


def test_backward_in_place_fp32():
    logits, targets, g, ge = make(8, 1029)
    original = logits.clone()
    _, lse, ent = native.vocab_forward(logits, targets, 1.5)
    out = native.vocab_backward(logits, targets, lse, ent, g, ge, 1.5, out=logits)
    assert out is logits
    assert_close(logits, ref_grad(original, targets, g, ge, 1.5), atol=1e-5, rtol=2e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_backward_bf16_logits(out_dtype):
    logits, targets, g, ge = make(8, 777, torch.bfloat16)
    original = logits.clone()
    _, lse, ent = native.vocab_forward(logits, targets)
    if out_dtype == torch.bfloat16:
        out = native.vocab_backward(logits, targets, lse, ent, g, ge, out=logits)  # in place
        assert out is logits and out.dtype == torch.bfloat16
        want = ref_grad(original, targets, g, ge)
        # One bf16 rounding of an fp32-accurate value.
        assert_close(out, want, atol=1e-6, rtol=2 ** -8)
    else:
        out = torch.empty(logits.shape, dtype=torch.float32)
        native.vocab_backward(logits, targets, lse, ent, g, ge, out=out)
        assert_close(out, ref_grad(original, targets, g, ge), atol=1e-5, rtol=2e-5)


def test_backward_fp16_logits():
    logits, targets, g, _ = make(6, 333, torch.float16, scale=2.0)
    _, lse, ent = native.vocab_forward(logits, targets)
    out = native.vocab_backward(logits, targets, lse, ent, g, None)
    assert out.dtype == torch.float16
    assert_close(out, ref_grad(logits, targets, g, None), atol=1e-6, rtol=2 ** -10)


def test_backward_strided_and_padding_rows():
    logits, targets, g, ge = make(7, 301)
    g[3] = 0.0
    ge[3] = 0.0  # a padding row: all zeros
    g[4] = 0.0  # entropy gradient only
    _, lse, ent = native.vocab_forward(logits, targets)
    want = ref_grad(logits, targets, g, ge)
    buf = torch.full((7, 320), 7.0)
    rows = buf[:, 10:311]
    native.vocab_backward(logits, targets, lse, ent, g, ge, out=rows)
    assert_close(rows, want, atol=1e-5, rtol=2e-5)
    assert (buf[:, :10] == 7).all() and (buf[:, 311:] == 7).all()  # outside the view untouched
    assert (rows[3] == 0).all()
    cols = torch.empty(301, 7).t()  # column-strided out
    native.vocab_backward(logits, targets, lse, ent, g, ge, out=cols)
    assert_close(cols, want, atol=1e-5, rtol=2e-5)


def test_backward_masked_logits_and_empty():
    logits, _, g, ge = make(5, 200)
    logits[:, :50] = float("-inf")
    targets = torch.tensor([50, 199, 120, 77, -100])
    _, lse, ent = native.vocab_forward(logits, targets)
    dz = native.vocab_backward(logits, targets, lse, ent, g, ge)
    assert torch.isfinite(dz).all() and (dz[:, :50] == 0).all()
    # Masked columns carry no probability: the gradient equals that of the unmasked part.
    want = ref_grad(logits[:, 50:], torch.where(targets >= 0, targets - 50, targets), g, ge)
    assert_close(dz[:, 50:], want, atol=1e-5, rtol=2e-5)

    e = torch.empty(0, 64)
    t = torch.empty(0, dtype=torch.long)
    z = torch.empty(0)
    assert native.vocab_backward(e, t, z, z, z, z).shape == (0, 64)


def test_ops_trace_under_torch_compile():
    logits, targets, g, ge = make(6, 100)

    def step(x):
        logp, lse, ent = native.vocab_forward(x, targets, 1.0)
        native.vocab_backward(x, targets, lse, ent, g, ge, 1.0, out=x)
        return logp

    eager_x, compiled_x = logits.clone(), logits.clone()
    want = step(eager_x)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled_x)
    assert torch.equal(got, want) and torch.equal(compiled_x, eager_x)


# ---- fallback ---------------------------------------------------------------------------------

def test_disabled_by_env(monkeypatch):
    from opo_kernels import dispatch

    monkeypatch.setenv("OPO_DISABLE_NATIVE", "1")
    assert native.available() is False
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.delenv("OPO_DISABLE_NATIVE")
    assert native.available() is True


def test_failed_build_warns_once_and_falls_back(tmp_path):
    # A fresh build directory and a compiler that always fails: the build must fail, and
    # available() must turn that into False plus exactly one RuntimeWarning.
    script = textwrap.dedent("""
        import warnings
        from opo_kernels import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = native.available(), native.available()
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(first, second, len(msgs))
        print(msgs[0] if msgs else "")
    """)
    env = dict(os.environ, CXX="/bin/false", OPO_NATIVE_BUILD_DIR=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPO_DISABLE_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    head, msg = res.stdout.strip().splitlines()[-2:]
    assert head == "False False 1"
    assert "native CPU vocabulary pass" in msg and "PyTorch" in msg
