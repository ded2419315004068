"""Triton kernels against their pure-torch references: outputs and every gradient.

On CPU these run the real kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1
before anything imports triton). The interpreter is slow, so shapes are small (L ~ 16-50) except
one D=768 case per op. Every kernel launch happens under `poison_outputs()`: buffers start as NaN,
so an element a kernel forgot to write fails the comparison. Inputs are fresh random tensors each
run; the seed is printed in the failure message.

Tolerances: fp32 results equal the reference up to reduction order. bf16 and fp16 get one ulp
of their type (rtol 1.6e-2, 2e-3): besides reduction order, the interpreter rounds fp32 -> bf16
by truncation where torch (and Triton on a GPU) rounds to nearest even.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fasttrain.kernels as K
# the package exports functions named like their modules: fetch the modules themselves
l1_mod = importlib.import_module("fasttrain.kernels.l1_align")
mg_mod = importlib.import_module("fasttrain.kernels.masked_gather")
from fasttrain.kernels.l1_align import l1_align, l1_align_reference
from fasttrain.kernels.masked_gather import (masked_gather, masked_gather_reference,
                                             unshuffle_with_mask_token,
                                             unshuffle_with_mask_token_reference)

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")

# rtol per element; atol relative to the largest reference element (gradients of a mean are tiny)
TOL = {torch.float32: dict(rtol=1e-5, atol_rel=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol_rel=1e-3),
       torch.float16: dict(rtol=2e-3, atol_rel=1e-3)}


@pytest.fixture
def gen():
    """A freshly seeded generator per test; the seed goes into failure messages."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed)  # gen.initial_seed() recovers it


# Forcing Triton on CPU tensors needs the interpreter (conftest sets TRITON_INTERPRET=1 when there
# is no GPU). On a GPU machine those tests skip; the `cuda` tests run the compiled kernels there.
INTERPRETED = K.HAS_TRITON and K._interpreting(mg_mod._gather_fwd_kernel)
NO_INTERPRETER = "Triton on CPU tensors needs TRITON_INTERPRET=1 at import (set when there is no GPU)"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason=NO_INTERPRETER)


@pytest.fixture
def triton_backend():
    if not INTERPRETED:
        pytest.skip(NO_INTERPRETER)
    with K.use_backend("triton"):
        yield


def _close(actual, expected, dtype, what, gen):
    tol = TOL[dtype]
    atol = tol["atol_rel"] * float(expected.detach().abs().max().float()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what} (seed {gen.initial_seed()}): {m}")


def _masking(N, L, K_, gen, device="cpu"):
    """MAE's random masking indices: ids_keep [N, K], ids_restore [N, L]."""
    noise = torch.rand(N, L, generator=gen)
    ids_shuffle = noise.argsort(dim=1)  # [N, L]
    ids_restore = ids_shuffle.argsort(dim=1)  # [N, L]
    return ids_shuffle[:, :K_].contiguous().to(device), ids_restore.to(device)


# ----------------------------------------------------------------------------------------------
# masked_gather
# ----------------------------------------------------------------------------------------------

GATHER_CASES = [
    # N, L, K, D, x dtype, pos dtype (None: no pos-embed)
    (3, 16, 1, 192, torch.float32, torch.float32),  # K = 1
    (2, 16, 16, 384, torch.bfloat16, torch.float32),  # K = L, bf16 tokens + fp32 pos (autocast)
    (5, 49, 12, 100, torch.float32, None),  # odd N, D not a multiple of 64
    (3, 17, 4, 192, torch.bfloat16, torch.bfloat16),
    (1, 50, 13, 768, torch.bfloat16, None),  # the one wide case
    (3, 17, 4, 100, torch.float16, torch.float16),
]


@pytest.mark.parametrize("N,L,K_,D,dtype,pos_dtype", GATHER_CASES)
def test_masked_gather_matches_reference(N, L, K_, D, dtype, pos_dtype, gen, triton_backend):
    x = torch.randn(N, L, D, generator=gen).to(dtype).requires_grad_(True)
    pos = None
    if pos_dtype is not None:
        pos = torch.randn(1, L, D, generator=gen).to(pos_dtype).requires_grad_(True)
    ids_keep, _ = _masking(N, L, K_, gen)
    inputs = (x,) if pos is None else (x, pos)
    with K.poison_outputs():
        out = masked_gather(x, ids_keep, pos)
        assert out.grad_fn is not None and "MaskedGatherFn" in type(out.grad_fn).__name__
        grad = torch.randn(out.shape, generator=gen).to(out.dtype)
        grads = torch.autograd.grad(out, inputs, grad)
    ref = masked_gather_reference(x, ids_keep, pos)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    assert out.dtype == ref.dtype and out.shape == ref.shape == (N, K_, D)
    _close(out, ref, dtype, "out", gen)
    _close(grads[0], ref_grads[0], dtype, "grad x", gen)
    if pos is not None:
        assert grads[1].dtype == pos.dtype
        _close(grads[1], ref_grads[1], dtype, "grad pos_embed", gen)


def test_masked_gather_grad_to_one_input_only(gen, triton_backend):
    """Only pos_embed requires grad (x frozen), then only x: each backward alone."""
    N, L, K_, D = 3, 20, 5, 64
    ids_keep, _ = _masking(N, L, K_, gen)
    for x_grad in (False, True):
        x = torch.randn(N, L, D, generator=gen).requires_grad_(x_grad)
        pos = torch.randn(1, L, D, generator=gen).requires_grad_(not x_grad)
        leaf = x if x_grad else pos
        with K.poison_outputs():
            (g,) = torch.autograd.grad(masked_gather(x, ids_keep, pos).square().sum(), leaf)
        (r,) = torch.autograd.grad(masked_gather_reference(x, ids_keep, pos).square().sum(), leaf)
        _close(g, r, torch.float32, f"grad {'x' if x_grad else 'pos'}", gen)


# ----------------------------------------------------------------------------------------------
# unshuffle_with_mask_token
# ----------------------------------------------------------------------------------------------

UNSHUFFLE_CASES = [
    # N, L, K, D, x_vis dtype, mask-token dtype, mask-token shape is [1, 1, D]
    (3, 16, 1, 192, torch.float32, torch.float32, True),  # K = 1 (all but one masked)
    (2, 16, 16, 384, torch.float32, torch.float32, False),  # K = L (no mask token used)
    (5, 49, 12, 100, torch.bfloat16, torch.float32, True),  # odd N, bf16 decoder, fp32 param
    (3, 17, 4, 192, torch.bfloat16, torch.bfloat16, False),
    (1, 50, 13, 768, torch.float32, torch.float32, True),
    (2, 20, 5, 64, torch.float16, torch.float32, False),
]


@pytest.mark.parametrize("N,L,K_,D,dtype,tok_dtype,tok_3d", UNSHUFFLE_CASES)
def test_unshuffle_matches_reference(N, L, K_, D, dtype, tok_dtype, tok_3d, gen, triton_backend):
    x_vis = torch.randn(N, K_, D, generator=gen).to(dtype).requires_grad_(True)
    tok = torch.randn((1, 1, D) if tok_3d else (D,), generator=gen).to(tok_dtype).requires_grad_(True)
    _, ids_restore = _masking(N, L, K_, gen)
    with K.poison_outputs():
        out = unshuffle_with_mask_token(x_vis, tok, ids_restore)
        assert "UnshuffleWithMaskTokenFn" in type(out.grad_fn).__name__
        grad = torch.randn(out.shape, generator=gen).to(out.dtype)
        g_x, g_tok = torch.autograd.grad(out, (x_vis, tok), grad)
    ref = unshuffle_with_mask_token_reference(x_vis, tok, ids_restore)
    r_x, r_tok = torch.autograd.grad(ref, (x_vis, tok), grad)
    assert out.dtype == ref.dtype and out.shape == ref.shape == (N, L, D)
    assert g_tok.shape == tok.shape and g_tok.dtype == tok.dtype
    _close(out, ref, dtype, "out", gen)
    _close(g_x, r_x, dtype, "grad x_vis", gen)
    _close(g_tok, r_tok, dtype, "grad mask_token", gen)


def test_unshuffle_grad_to_mask_token_only(gen, triton_backend):
    N, L, K_, D = 2, 24, 6, 64
    x_vis = torch.randn(N, K_, D, generator=gen)
    tok = torch.randn(1, 1, D, generator=gen, requires_grad=True)
    _, ids_restore = _masking(N, L, K_, gen)
    with K.poison_outputs():
        (g,) = torch.autograd.grad(unshuffle_with_mask_token(x_vis, tok, ids_restore).sum(), tok)
    # each of the N*(L-K) masked positions contributes 1 to every channel
    torch.testing.assert_close(g, torch.full_like(tok, N * (L - K_)))


# ----------------------------------------------------------------------------------------------
# l1_align
# ----------------------------------------------------------------------------------------------

L1_CASES = [
    # N, T, D, student dtype, teacher dtype
    (3, 17, 192, torch.float32, torch.float32),
    (1, 1, 100, torch.float32, torch.float32),  # a single token
    (5, 13, 384, torch.bfloat16, torch.bfloat16),  # odd N, bf16: fp32 accumulation inside
    (2, 50, 768, torch.bfloat16, torch.float32),  # the wide case, mixed dtypes
    (3, 7, 64, torch.float16, torch.float16),
]


def _tie_free_rows(s, t, eps):
    """Token rows where no element of s_hat - t_hat is within 1e-6 of 0 (fp32 rounding is ~1e-9):
    abs' derivative jumps there, so rounding could flip its sign between implementations."""
    s32, t32 = s.detach().float(), t.float()
    sn = s32 / s32.norm(dim=-1, keepdim=True).clamp_min(eps)
    tn = t32 / t32.norm(dim=-1, keepdim=True).clamp_min(eps)
    diff = (sn - tn).abs()
    return (diff > 1e-6).all(dim=-1) | (diff == 0).all(dim=-1)  # [N, T]; exact ties are exact


def _check_l1_grad(g, r, s, t, dtype, gen):
    rows = _tie_free_rows(s, t, l1_mod.EPS)
    assert rows.float().mean() > 0.8
    # per-row scale: clamped rows' grads (g / eps) dwarf the others (g / ||s||); compare each
    # row multiplied by its max(||s||, eps), i.e. sign(.) / numel minus the Jacobian term
    norm = s.detach().float().norm(dim=-1, keepdim=True).clamp_min(l1_mod.EPS)  # [N, T, 1]
    _close((g.float() * norm)[rows], (r.float() * norm)[rows], dtype, "grad s", gen)


@pytest.mark.parametrize("N,T,D,dtype,t_dtype", L1_CASES)
def test_l1_align_matches_reference(N, T, D, dtype, t_dtype, gen, triton_backend):
    s = torch.randn(N, T, D, generator=gen)
    t = torch.randn(N, T, D, generator=gen).to(t_dtype)
    if N * T >= 3:
        s[0, 0] = 0.0  # zero token: the eps clamp (||s|| < eps) branch with s = 0
        s[-1, -1] *= 1e-9  # tiny token: clamp branch with s != 0
        t[0, -1] = 0.0  # zero teacher token
    s = s.to(dtype)
    if N * T >= 3:
        t[0, 1] = s[0, 1].to(t.dtype)  # s_hat == t_hat exactly: abs' subgradient must be 0
    s.requires_grad_(True)
    with K.poison_outputs():
        loss = l1_align(s, t)
        assert "L1AlignFn" in type(loss.grad_fn).__name__
        (g,) = torch.autograd.grad(loss * 3.0, s)  # a non-unit upstream grad
    ref = l1_align_reference(s, t)
    (r,) = torch.autograd.grad(ref * 3.0, s)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)  # fp32 accumulation for any dtype
    assert g.dtype == s.dtype
    _check_l1_grad(g, r, s, t, dtype, gen)


def test_l1_align_no_grad_to_teacher(gen, triton_backend):
    s = torch.randn(2, 5, 64, generator=gen, requires_grad=True)
    t = torch.randn(2, 5, 64, generator=gen, requires_grad=True)
    loss = l1_align(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_l1_align_custom_eps(gen, triton_backend):
    """A large eps puts every token in the clamp branch: grad = sign(.) / (eps * numel)."""
    s = torch.randn(2, 3, 64, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 64, generator=gen)
    with K.poison_outputs():
        loss = l1_align(s, t, eps=1e3)
        (g,) = torch.autograd.grad(loss, s)
    ref = l1_align_reference(s, t, eps=1e3)
    (r,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, r)


# ----------------------------------------------------------------------------------------------
# Strided inputs: the slices the model passes (ids_shuffle[:, :K], x[:, 1:]) are read in place
# ----------------------------------------------------------------------------------------------

def test_strided_inputs(gen, triton_backend):
    N, L, K_, D = 3, 20, 5, 64
    ids_shuffle = torch.rand(N, L, generator=gen).argsort(dim=1)  # [N, L]
    ids_keep, ids_restore = ids_shuffle[:, :K_], ids_shuffle.argsort(dim=1)  # [N, K] is a slice
    assert not ids_keep.is_contiguous()
    x = torch.randn(N, L, D, generator=gen, requires_grad=True)
    pos_full = torch.randn(1, L + 1, D, generator=gen, requires_grad=True)
    latent = torch.randn(N, 1 + K_, D, generator=gen, requires_grad=True)  # cls + visible
    tok = torch.randn(D, generator=gen, requires_grad=True)
    t_full = torch.randn(N, 1 + L, D, generator=gen)

    def run(gather, unshuffle, align):
        vis = gather(x, ids_keep, pos_full[:, 1:])  # [N, K, D]
        full = unshuffle(latent[:, 1:], tok, ids_restore)  # [N, L, D] from a slice
        loss = align(full[:, ::2], t_full[:, 1::2]) + vis.square().mean()  # strided T as well
        return (loss, *torch.autograd.grad(loss, (x, pos_full, latent, tok)))

    with K.poison_outputs():
        got = run(masked_gather, unshuffle_with_mask_token, l1_align)
    exp = run(masked_gather_reference, unshuffle_with_mask_token_reference, l1_align_reference)
    for name, a, b in zip(("loss", "x", "pos", "latent", "tok"), got, exp):
        _close(a, b, torch.float32, f"strided {name}", gen)


# ----------------------------------------------------------------------------------------------
# The pre-training step reaches the kernels only through the dispatch: same losses, same grads
# ----------------------------------------------------------------------------------------------

@needs_interpreter
def test_etmae_step_same_on_both_backends(gen):
    from fasttrain.models import build_etmae
    torch.manual_seed(gen.initial_seed())
    tiny = dict(img_size=32, patch_size=8, in_chans=1, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2)
    model = build_etmae("mae_vit_tiny_patch16", "mae_vit_small_patch16", student_blocks=(1,),
                        teacher_blocks=(1,), teacher_overrides=dict(depth=2, embed_dim=96, num_heads=2),
                        depth=2, embed_dim=64, num_heads=2, **tiny)
    imgs = torch.randn(3, 1, 32, 32, generator=gen)
    noise = torch.rand(3, 16, generator=gen)  # same masking for both runs
    runs = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with K.use_backend(backend), K.poison_outputs():
            out = model(imgs, noise=noise)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[backend] = (out.loss_mae.detach(), out.loss_dist.detach(), grads)
    (ref_mae, ref_dist, ref_grads), (mae, dist, grads) = runs["torch"], runs["triton"]
    torch.testing.assert_close(mae, ref_mae)
    torch.testing.assert_close(dist, ref_dist)
    assert grads.keys() == ref_grads.keys() and any("mask_token" in n for n in grads)
    for name in grads:
        _close(grads[name], ref_grads[name], torch.float32, f"grad {name}", gen)


# ----------------------------------------------------------------------------------------------
# torch.compile: the custom ops stay in the graph (fullgraph=True fails on any graph break)
# ----------------------------------------------------------------------------------------------

def test_compiled_ops_trace_without_graph_breaks(gen, triton_backend):
    """Dynamo + AOTAutograd trace forward and backward of all three ops as one graph (the
    `aot_eager` backend runs that graph, so the interpreted kernels run inside it)."""
    N, L, K_, D = 2, 16, 4, 64
    x = torch.randn(N, L, D, generator=gen, requires_grad=True)
    pos = torch.randn(1, L, D, generator=gen, requires_grad=True)
    tok = torch.randn(1, 1, D, generator=gen, requires_grad=True)
    t = torch.randn(N, L, D, generator=gen)
    ids_keep, ids_restore = _masking(N, L, K_, gen)

    def step(x, pos, tok):
        vis = masked_gather(x, ids_keep, pos)  # [N, K, D]
        full = unshuffle_with_mask_token(vis * 2.0, tok, ids_restore)  # [N, L, D]
        return l1_align(full, t)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, pos, tok)
    grads = torch.autograd.grad(loss, (x, pos, tok))
    with K.use_backend("torch"):
        ref = step(x, pos, tok)
        ref_grads = torch.autograd.grad(ref, (x, pos, tok))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def test_default_backend_is_auto_and_cpu_runs_reference(gen):
    assert K.DEFAULT_BACKEND == "auto" and K.get_backend() == "auto"
    x = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    ids_keep, ids_restore = _masking(2, 8, 3, gen)
    assert "GatherBackward" in type(masked_gather(x, ids_keep).grad_fn).__name__
    vis = torch.randn(2, 3, 16, generator=gen, requires_grad=True)
    tok = torch.zeros(16, requires_grad=True)
    assert "GatherBackward" in type(unshuffle_with_mask_token(vis, tok, ids_restore).grad_fn).__name__
    assert "MeanBackward" in type(l1_align(x, x.detach()).grad_fn).__name__


@needs_interpreter
def test_forced_backends(gen):
    x = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    ids_keep, _ = _masking(2, 8, 3, gen)
    with K.use_backend("torch"):
        assert "GatherBackward" in type(masked_gather(x, ids_keep).grad_fn).__name__
    with K.use_backend("triton"):
        assert "MaskedGatherFn" in type(masked_gather(x, ids_keep).grad_fn).__name__
        assert "L1AlignFn" in type(l1_align(x, x.detach()).grad_fn).__name__
    assert K.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        K.set_backend("cuda")


def test_use_triton_rule(monkeypatch):
    cuda = types.SimpleNamespace(is_cuda=True)
    cpu = types.SimpleNamespace(is_cuda=False, device="cpu")
    kernel = mg_mod._gather_fwd_kernel
    assert K.use_triton("op", kernel, cuda, cuda)  # auto + CUDA -> Triton
    assert not K.use_triton("op", kernel, cuda, cpu)  # auto + any CPU tensor -> reference
    with K.use_backend("torch"):
        assert not K.use_triton("op", kernel, cuda)
    # forced on CPU without the interpreter: a clear error instead of a crash inside Triton
    monkeypatch.setattr(K, "_interpreting", lambda kernel: False)
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.use_triton("masked_gather", kernel, cpu)
    # triton missing: auto falls back to the reference, forced triton says what to install
    monkeypatch.setattr(K, "HAS_TRITON", False)
    assert not K.use_triton("op", kernel, cuda)
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        K.use_triton("l1_align", kernel, cuda)


def test_without_triton_everything_runs_the_reference(tmp_path):
    """The triton import is guarded: with triton unimportable, auto runs the references and a
    forced "triton" says what is missing (a fresh interpreter, triton blocked in sys.modules)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fasttrain.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "x = torch.randn(2, 8, 16, requires_grad=True); ids = torch.tensor([[0, 5], [3, 1]])\n"
        "out = K.masked_gather(x, ids, torch.zeros(1, 8, 16)); out.sum().backward()\n"
        "K.unshuffle_with_mask_token(out, torch.zeros(16), torch.arange(8).repeat(2, 1))\n"
        "K.l1_align(x, x.detach() + 1).backward()\n"
        "K.set_backend('triton')\n"
        "try:\n"
        "    K.l1_align(x, x)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "    print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]


def _bad(fn, exc, match):
    with K.use_backend("triton"), pytest.raises(exc, match=match):
        fn()


@needs_interpreter
def test_masked_gather_errors():
    x = torch.randn(2, 8, 16)
    ids = torch.tensor([[0, 3], [7, 1]])
    _bad(lambda: masked_gather(x[0], ids), ValueError, r"x must be \[N, L, D\]")
    _bad(lambda: masked_gather(x.long(), ids), TypeError, "x must be float32, bfloat16 or float16")
    _bad(lambda: masked_gather(x, ids.int()), TypeError, "ids_keep must be int64")
    _bad(lambda: masked_gather(x, ids[:1]), ValueError, r"ids_keep must be \[N=2")
    _bad(lambda: masked_gather(x, torch.zeros(2, 9, dtype=torch.long)), ValueError, "keeps K=9")
    _bad(lambda: masked_gather(x, ids, torch.randn(1, 7, 16)), ValueError, r"pos_embed must be \[1, L=8, D=16\]")
    _bad(lambda: masked_gather(x, torch.tensor([[0, 8], [1, 2]])), ValueError, r"values must lie in \[0, 8\)")
    _bad(lambda: masked_gather(x, torch.tensor([[1, 1], [1, 2]])), ValueError, "distinct")
    _bad(lambda: masked_gather(x, ids.to("meta")), ValueError, "one device")
    # the launchers refuse a non-dense last dim (the entry point copies such inputs first)
    x_t = torch.randn(2, 16, 8).transpose(1, 2)  # [2, 8, 16], stride(-1) = 8
    with pytest.raises(ValueError, match="x must be dense along its last dim"):
        mg_mod.masked_gather_fwd_launch(x_t, ids, None)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        mg_mod.masked_gather_bwd_launch(torch.randn(2, 16, 2).transpose(1, 2), ids, 8,
                                        torch.float32, torch.float32, True, False)
    with K.use_backend("triton"):  # ... and the entry point does copy them
        torch.testing.assert_close(masked_gather(x_t, ids), masked_gather_reference(x_t, ids))


@needs_interpreter
def test_unshuffle_errors(gen):
    vis = torch.randn(2, 3, 16)
    _, ids_restore = _masking(2, 8, 3, gen)
    _bad(lambda: unshuffle_with_mask_token(vis, torch.zeros(15), ids_restore), ValueError,
         "mask_token must hold D=16 values")
    _bad(lambda: unshuffle_with_mask_token(vis, torch.zeros(16), ids_restore[:, :2]), ValueError,
         "fewer than the K=3 visible")
    _bad(lambda: unshuffle_with_mask_token(vis, torch.zeros(16), ids_restore.clone().fill_(0)),
         ValueError, "permutation")
    _bad(lambda: unshuffle_with_mask_token(vis, torch.zeros(16, dtype=torch.int32), ids_restore),
         TypeError, "mask_token must be float32")


@needs_interpreter
def test_l1_align_errors():
    s = torch.randn(2, 3, 16)
    _bad(lambda: l1_align(s, s[:, :2]), ValueError, "t must have the shape of s")
    _bad(lambda: l1_align(s[0], s[0]), ValueError, r"s must be \[N, T, D\]")
    _bad(lambda: l1_align(s.double(), s), TypeError, "s must be float32, bfloat16 or float16")
    _bad(lambda: l1_align(s, s, eps=0.0), ValueError, "eps must be > 0")
    _bad(lambda: l1_align(s, s.to("meta")), ValueError, "one device")


# ----------------------------------------------------------------------------------------------
# The real Triton compiler (not the interpreter) accepts every kernel: compile for sm_90 on CPU
# ----------------------------------------------------------------------------------------------

_SM90_COMPILE = """
import importlib, sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
mg = importlib.import_module("fasttrain.kernels.masked_gather")
l1 = importlib.import_module("fasttrain.kernels.l1_align")
assert type(mg._gather_fwd_kernel).__name__ == "JITFunction"
full = sys.argv[1] == "full"
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
      torch.int32: "i32"}
launches = {}

def record(kernel, grid, *args, **meta):
    # the launchers' real calls, turned into Triton signatures: pointer dtypes, scalars, constexprs
    consts = {k: v for k, v in meta.items() if k in kernel.arg_names}
    plain = iter(args)
    sig = {}
    for name in kernel.arg_names:
        a = consts.get(name) if name in consts else next(plain)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(a, torch.Tensor):
            sig[name] = "*" + TY[a.dtype]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            assert isinstance(a, int) and not isinstance(a, bool), (kernel.__name__, name, a)
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
    assert next(plain, None) is None, kernel.__name__
    key = (kernel.__name__, tuple(sig.values()), tuple(sorted(consts.items())), meta.get("num_warps", 4))
    launches.setdefault(key, (kernel, sig, consts, meta.get("num_warps", 4)))

mg.launch = l1.launch = record
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
N, L, K = 3, 196, 49
ids = torch.rand(N, L).argsort(1)
keep, restore = ids[:, :K], ids.argsort(1)
# (token dtype, param dtype): fp32 and bf16 (autocast: bf16 tokens, fp32 params), fp16 in full
gather = [(F32, F32), (BF16, F32), (BF16, BF16), (F32, None), (BF16, None)] + full * [(F16, F16), (F16, None)]
unshuffle = [(F32, F32), (BF16, F32), (BF16, BF16)] + full * [(F16, F32), (F16, F16)]
align = [(F32, F32), (BF16, BF16), (BF16, F32)] + full * [(F16, F16)]
for D in ((192, 100, 384, 768) if full else (192,)):
    for xd, pd in gather:
        x = torch.randn(N, L, D, dtype=xd)
        pos = None if pd is None else torch.randn(1, L, D, dtype=pd)
        out = mg.masked_gather_fwd_launch(x, keep, pos)
        for need_x, need_pos in ((True, True), (True, False), (False, True)):
            if not need_pos or pos is not None:
                mg.masked_gather_bwd_launch(torch.randn_like(out), keep, L, xd, pd or xd, need_x, need_pos)
    for vd, td in unshuffle:
        out = mg.unshuffle_fwd_launch(torch.randn(N, K, D, dtype=vd), torch.randn(D, dtype=td), restore)
        for need_x, need_tok in ((True, True), (True, False), (False, True)):
            mg.unshuffle_bwd_launch(torch.randn_like(out), restore, K, td, need_x, need_tok)
for D in ((192, 100, 384, 768) if full else (192, 768)):  # 768: the widest tile, 8 warps
    for sd, td in align:
        s, t = torch.randn(N, K + 1, D, dtype=sd), torch.randn(N, K + 1, D, dtype=td)
        l1.l1_align_fwd_launch(s, t, 1e-6)
        l1.l1_align_bwd_launch(s, t, torch.ones(()), 1e-6)
names = {key[0] for key in launches}
assert len(names) == 6, names
for kernel, sig, consts, warps in launches.values():
    triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})
print("OK", len(launches))
"""


def _compile_sm90(tmp_path, which: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, every time
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE, which], capture_output=True, text=True,
                         env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stderr[-3000:]


def test_kernels_compile_for_sm90(tmp_path):
    """Type errors the interpreter lets through fail here (ptxas ships with triton: no GPU
    needed). A fresh interpreter without TRITON_INTERPRET, so triton.jit builds real kernels.
    The signatures come from the launchers' own calls (launch intercepted), for every kernel,
    fp32 and bf16 (incl. bf16 tokens + fp32 params) and every constexpr branch (which gradients
    are needed), so what compiles here is what the entry points launch on a GPU."""
    _compile_sm90(tmp_path, "fast")


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_dtypes_and_widths(tmp_path):
    """The same with fp16 and the widths 100/384/768 (other tiles and masked lanes)."""
    _compile_sm90(tmp_path, "full")


# ----------------------------------------------------------------------------------------------
# Benchmark smoke (timings are never asserted)
# ----------------------------------------------------------------------------------------------

def test_bench_kernels_json_smoke(capsys):
    from fasttrain.bench import kernels as bench
    rc = bench.main(["--json", "--shapes", "small", "--no-compile", "--reps", "2"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]
    assert records and all(r["bench"] == "kernels" for r in records)
    ops = {r["op"] for r in records}
    assert ops == {"masked_gather", "unshuffle_with_mask_token", "l1_align"}
    for r in records:
        assert r["ms"] > 0 and r["gb_per_s"] > 0 and r["pass"] in ("fwd", "fwd+bwd")
        assert r["impl"] in ("eager", "compiled", "triton") and r["copy_gb_per_s"] > 0
        assert "provenance" in r


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at the paper's shapes (scripts/gpu_check.sh runs these)
# ----------------------------------------------------------------------------------------------

PAPER = dict(N=256, L=196, K=49)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [192, 384, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference_paper_shapes(D, dtype, gen):
    """auto on CUDA runs the compiled Triton kernels (rounding to nearest, so bf16 matches the
    reference closer than under the interpreter; the same tolerances hold)."""
    N, L, K_ = PAPER["N"], PAPER["L"], PAPER["K"]
    dev = "cuda"
    ids_keep, ids_restore = _masking(N, L, K_, gen, device=dev)
    x = torch.randn(N, L, D, generator=gen).to(dev, dtype).requires_grad_(True)
    pos = torch.randn(1, L, D, generator=gen).to(dev).requires_grad_(True)  # fp32 param
    tok = torch.randn(1, 1, D, generator=gen).to(dev).requires_grad_(True)
    vis = torch.randn(N, K_, D, generator=gen).to(dev, dtype).requires_grad_(True)
    s = torch.randn(N, K_ + 1, D, generator=gen).to(dev, dtype).requires_grad_(True)
    t = torch.randn(N, K_ + 1, D, generator=gen).to(dev, dtype)
    def against_reference(fn, ref, args, wrt, fn_class, names):
        with K.use_backend("auto"), K.poison_outputs():
            out = fn(*args)
            assert fn_class in type(out.grad_fn).__name__
            g = torch.randn_like(out)
            got = (out, *torch.autograd.grad(out, wrt, g))
        r = ref(*args)
        exp = (r, *torch.autograd.grad(r, wrt, g))
        for name, a, b in zip(names, got, exp):
            _close(a, b, dtype, f"{fn.__name__} {name}", gen)

    against_reference(masked_gather, masked_gather_reference, (x, ids_keep, pos), (x, pos), "MaskedGatherFn",
                      ("out", "grad x", "grad pos"))
    against_reference(unshuffle_with_mask_token, unshuffle_with_mask_token_reference, (vis, tok, ids_restore),
                      (vis, tok), "UnshuffleWithMaskTokenFn", ("out", "grad x_vis", "grad mask_token"))

    with K.use_backend("auto"), K.poison_outputs():
        loss = l1_align(s, t)
        assert "L1AlignFn" in type(loss.grad_fn).__name__
        (gs,) = torch.autograd.grad(loss, s)
    ref = l1_align_reference(s, t)
    (rs,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    _check_l1_grad(gs, rs, s, t, dtype, gen)


@pytest.mark.parametrize("dev", [pytest.param("cuda", marks=pytest.mark.cuda),
                                 pytest.param("cpu", marks=[pytest.mark.slow, needs_interpreter])])
def test_inductor_compiles_kernels(dev, gen, monkeypatch):
    """The trainer compiles its step with Inductor: the custom ops must run inside the compiled
    forward and backward (counted at launch). On CPU the interpreted kernels run (forced)."""
    N, L, K_, D = (8, 196, 49, 192) if dev == "cuda" else (3, 24, 6, 64)
    ids_keep, ids_restore = _masking(N, L, K_, gen, device=dev)
    x = torch.randn(N, L, D, generator=gen).to(dev).requires_grad_(True)
    pos = torch.randn(1, L, D, generator=gen).to(dev).requires_grad_(True)
    tok = torch.randn(1, 1, D, generator=gen).to(dev).requires_grad_(True)
    t = torch.randn(N, L, D, generator=gen).to(dev)

    def step(x, pos, tok):
        vis = masked_gather(x, ids_keep, pos)  # [N, K, D]
        return l1_align(unshuffle_with_mask_token(vis.sin(), tok, ids_restore), t)

    launched = []
    for mod in (mg_mod, l1_mod):
        real = mod.launch
        monkeypatch.setattr(mod, "launch", lambda kernel, *a, _real=real, **kw: (
            launched.append(kernel.__name__), _real(kernel, *a, **kw))[1])
    torch._dynamo.reset()
    with K.use_backend("auto" if dev == "cuda" else "triton"):
        loss = torch.compile(step, fullgraph=True)(x, pos, tok)
        grads = torch.autograd.grad(loss, (x, pos, tok))
    kernels_run = {name for name in launched}
    assert {"_gather_fwd_kernel", "_gather_bwd_kernel", "_unshuffle_fwd_kernel",
            "_unshuffle_bwd_kernel", "_l1_align_fwd_kernel", "_l1_align_bwd_kernel"} <= kernels_run
    with K.use_backend("torch"):
        ref = step(x, pos, tok)
        ref_grads = torch.autograd.grad(ref, (x, pos, tok))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float32, "compiled grad", gen)
    torch._dynamo.reset()


def test_bench_kernels_cpu_default_is_quick_with_a_plan_and_budget(capsys):
    """On the CPU the default run is the small shapes without torch.compile; the plan comes first,
    a line per op and pass follows, and a budget too small for a second window stops every
    implementation after one kept window with a note in its row."""
    from fasttrain.bench import kernels as bench
    assert bench.main(["--json", "--ops", "l1_align", "--reps", "3", "--budget", "1e-9"]) == 0
    out, err = capsys.readouterr()
    plan = [ln for ln in err.splitlines() if ln.startswith("plan: ")]
    assert len(plan) == 1 and "1 ops x 1 widths (192)" in plan[0] and "N=8 L=196 K=49" in plan[0]
    assert "eager on cpu" in plan[0] and "2 warm-up + 3 windows" in plan[0] and "budget 1e-09 s" in plan[0]
    assert "l1_align fwd D=192: eager" in err and "l1_align fwd+bwd D=192: eager" in err
    records = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [(r["pass"], r["impl"]) for r in records] == [("fwd", "eager"), ("fwd+bwd", "eager")]
    for r in records:
        assert r["shapes"] == "small" and r["N"] == 8 and r["note"].startswith("stopped after 1 of 3 windows")
    # no budget: every window kept, no note
    assert bench.main(["--json", "--ops", "l1_align", "--reps", "2", "--budget", "0"]) == 0
    records = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert records and all(r["note"] is None and r["budget_s"] is None for r in records)
