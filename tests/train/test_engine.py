"""The training step: hand computation, fused vs reference, compiled vs eager, recompiles,
gradient accumulation, masked BCE, DDP 2 ranks == 1 rank."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fasttrain.config import OptimConfig
from fasttrain.models import ETMAE, create_model, param_groups_layer_decay
from fasttrain.models.classifier import NO_WEIGHT_DECAY
from fasttrain.train.engine import TrainStep, bce_masked
from fasttrain.train.optim import build_optimizer, param_groups_weight_decay

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_etmae(seed: int = 0, alpha: float = 0.7, depth: int = 2) -> ETMAE:
    torch.manual_seed(seed)
    student = create_model("mae_vit_tiny_patch16", **{**TINY, "depth": depth})
    teacher = create_model("mae_vit_small_patch16", **{**TINY, "embed_dim": 24, "num_heads": 2, "depth": depth})
    return ETMAE(student, teacher, [0], [depth - 1], alpha=alpha)


def optimizer_for(model, mode: str, lr: float = 1e-2, **kw) -> torch.optim.Optimizer:
    cfg = OptimConfig(**kw)
    return build_optimizer(param_groups_weight_decay(model, cfg.weight_decay), lr, cfg,
                           reference=(mode == "reference"))


def sgd(model) -> torch.optim.Optimizer:
    """For comparisons of weights after several steps: SGD's update is the gradient itself, while
    Adam's first steps turn the float noise of gradients that are zero in theory (the attention key
    bias's) into full-size updates of random sign."""
    return torch.optim.SGD(model.trainable_parameters(), lr=0.1)


def batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 1, 16, 16, generator=g)
    noise = torch.rand(n, 16, generator=g)
    return imgs, noise


# ----------------------------------------------------------------------------- hand computation

def _embed_visible(m, imgs, keep):
    """Patch embedding + pos-embed, gather the kept tokens by hand, prepend cls -> [N, 1+K, D]."""
    x = F.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=m.patch_size)  # [N, D, g, g]
    x = x.flatten(2).transpose(1, 2) + m.pos_embed[:, 1:]  # [N, L, D]
    x = torch.stack([x[i, keep[i]] for i in range(x.shape[0])])  # [N, K, D]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def hand_losses(model: ETMAE, imgs, noise):
    """ETMAE's L_MAE and L_dist written out from the paper's equations (1) and (2)."""
    s, t = model.student, model.teacher
    N, L = noise.shape
    K = int(L * (1 - 0.75))
    keep = torch.argsort(noise, dim=1)[:, :K]  # the K patches with the smallest noise
    mask = torch.ones(N, L)
    for i in range(N):
        mask[i, keep[i]] = 0.0
    # student encoder, block-0 feature kept for distillation
    x = _embed_visible(s, imgs, keep)
    x = s.blocks[0](x)
    s_feat = x
    x = s.blocks[1](x)
    latent = s.norm(x)
    # decoder over all patches, mask tokens where removed
    y = s.decoder_embed(latent)
    full = s.mask_token.expand(N, L, -1).clone()
    for i in range(N):
        full[i, keep[i]] = y[i, 1:]
    z = torch.cat([y[:, :1], full], dim=1) + s.decoder_pos_embed
    for blk in s.decoder_blocks:
        z = blk(z)
    pred = s.decoder_pred(s.decoder_norm(z))[:, 1:]  # [N, L, p*p]
    p = s.patch_size
    target = imgs.reshape(N, 1, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(N, L, p * p)
    mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mu) / (var + 1e-6) ** 0.5
    loss_mae = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    # teacher on the same visible tokens, up to its block 1
    with torch.no_grad():
        u = t.blocks[1](t.blocks[0](_embed_visible(t, imgs, keep)))
    v = model.proj[0](s_feat)
    loss_dist = (v / v.norm(dim=-1, keepdim=True) - u / u.norm(dim=-1, keepdim=True)).abs().mean()
    return loss_mae, loss_dist


def decay_of(groups) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_pretrain_weight_decay_is_mae_add_weight_decay():
    """MAE's and Xiao et al.'s main_pretrain.py call timm's add_weight_decay(model, wd) with no
    skip list: no decay for 1-d tensors and biases, decay for every other trainable tensor
    (cls_token and mask_token are [1, 1, D]); the frozen sin-cos pos-embeds are in no group."""
    model = tiny_etmae()
    for part in (model.student, model.proj):
        wd = decay_of(param_groups_weight_decay(part, 0.05))
        for name, p in part.named_parameters():
            if not p.requires_grad:
                assert id(p) not in wd, name
                continue
            assert wd[id(p)] == (0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05), name
    wd = decay_of(param_groups_weight_decay(model.student, 0.05))
    assert wd[id(model.student.cls_token)] == 0.05 and wd[id(model.student.mask_token)] == 0.05
    assert id(model.student.pos_embed) not in wd and id(model.student.decoder_pos_embed) not in wd


def test_finetune_weight_decay_skips_mae_no_weight_decay_list():
    """Without layer decay, fine-tuning keeps MAE's no_weight_decay() names (pos_embed,
    cls_token) out of decay, as param_groups_lrd does with layer_decay 1."""
    clf = create_model("vit_tiny_patch16", **{k: TINY[k] for k in ("img_size", "patch_size", "in_chans",
                                                                    "embed_dim", "depth", "num_heads")},
                       num_classes=3)
    wd = decay_of(param_groups_weight_decay(clf, 0.05, NO_WEIGHT_DECAY))
    assert wd == decay_of(param_groups_layer_decay(clf, 0.05, 1.0))
    assert wd[id(clf.cls_token)] == 0.0 and wd[id(clf.pos_embed)] == 0.0
    assert all(g["lr_scale"] == 1.0 for g in param_groups_weight_decay(clf, 0.05))


def test_one_kd_step_equals_hand_computation():
    model = tiny_etmae()
    hand_model = copy.deepcopy(model)
    imgs, noise = batch()
    lr, wd, betas, eps = 1e-2, 0.05, (0.9, 0.95), 1e-8
    step = TrainStep(model, optimizer_for(model, "reference", lr), mode="reference")
    terms = step(imgs, noise=noise)
    lm, ld = hand_losses(hand_model, imgs, noise)
    assert torch.allclose(terms, torch.stack([lm + 0.7 * ld, lm, ld]).detach(), rtol=1e-5, atol=1e-6)
    # AdamW's first step by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps)
    total = lm + 0.7 * ld
    names = ["student.blocks.0.attn.qkv.weight", "student.decoder_pred.bias", "proj.0.weight"]
    params = dict(hand_model.named_parameters())
    grads = torch.autograd.grad(total, [params[n] for n in names])
    new = dict(model.named_parameters())
    for n, g in zip(names, grads):
        p0 = params[n].detach()
        decay = wd if p0.ndim > 1 else 0.0
        expect = p0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        assert torch.allclose(new[n].detach(), expect, rtol=1e-5, atol=1e-6), n
    # the teacher did not move
    for (n, a), b in zip(model.teacher.state_dict().items(), hand_model.teacher.state_dict().values()):
        assert torch.equal(a, b), n


def test_reference_mode_equals_fused_losses():
    imgs, noise = batch()
    ref = tiny_etmae()
    fused = tiny_etmae()
    r = TrainStep(ref, optimizer_for(ref, "reference"), mode="reference")
    f = TrainStep(fused, optimizer_for(fused, "fused"), mode="fused", amp="bf16", compile=False)
    assert r.teacher_mode == "full" and f.teacher_mode == "truncated"
    assert f.amp_dtype == torch.bfloat16 and fused.teacher.patch_embed.proj.weight.dtype == torch.bfloat16
    assert r.amp_dtype is None and ref.teacher.patch_embed.proj.weight.dtype == torch.float32
    for _ in range(3):  # a few steps: the updates agree too, within bf16 tolerance
        tr = r(imgs, noise=noise)
        tf = f(imgs, noise=noise)
        assert torch.allclose(tr, tf, rtol=3e-2, atol=3e-3), (tr, tf)


def test_grad_accumulation_equals_full_batch():
    imgs, noise = batch(n=8)
    a, b = tiny_etmae(), tiny_etmae()
    full = TrainStep(a, sgd(a), mode="fused", amp="fp32", accum_steps=1)
    acc = TrainStep(b, sgd(b), mode="fused", amp="fp32", accum_steps=2)
    for _ in range(2):
        full(imgs, noise=noise)
        acc(imgs[:4], noise=noise[:4])
        acc(imgs[4:], noise=noise[4:])
    assert full.opt_step == acc.opt_step == 2
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n


def test_clip_grad_and_schedule_applied():
    from fasttrain.train.optim import Schedule
    m = tiny_etmae()
    opt = optimizer_for(m, "fused", lr=1.0)
    sched = Schedule(opt, base_lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=8)
    step = TrainStep(m, opt, mode="fused", amp="fp32", clip_grad=1e-3, schedule=sched)
    imgs, noise = batch()
    step(imgs, noise=noise)
    assert step.last_lr == 0.0  # warm-up starts at 0
    step(imgs, noise=noise)
    assert step.last_lr == pytest.approx(0.25) and opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_mask_noise_is_reproducible_and_differs_per_step_and_rank():
    m = tiny_etmae()
    s0 = TrainStep(m, optimizer_for(m, "fused"), mode="fused", amp="fp32", seed=3)
    s1 = TrainStep(m, optimizer_for(m, "fused"), mode="fused", amp="fp32", seed=3, rank=1)
    a = s0.mask_noise(2)
    assert torch.equal(a, s0.mask_noise(2))  # same micro-step, same noise
    assert not torch.equal(a, s1.mask_noise(2))
    s0.micro_step += 1
    assert not torch.equal(a, s0.mask_noise(2))


def test_bce_masks_nan_labels():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.1, -0.2]])
    labels = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    valid = [(0, 0), (0, 2), (1, 0), (1, 1)]
    expect = sum(F.binary_cross_entropy_with_logits(logits[i, j], labels[i, j]) for i, j in valid) / 4
    assert torch.allclose(bce_masked(logits, labels), expect)


def test_finetune_step_trains_classifier():
    torch.manual_seed(0)
    clf = create_model("vit_tiny_patch16", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                       num_heads=2, num_classes=3, drop_path_rate=0.0)
    opt = optimizer_for(clf, "fused", lr=1e-2)
    step = TrainStep(clf, opt, kind="finetune", mode="fused", amp="bf16")
    imgs = torch.randn(8, 1, 16, 16)
    labels = (torch.rand(8, 3) > 0.5).float()
    first = step(imgs, labels)
    for _ in range(20):
        last = step(imgs, labels)
    assert first.shape == (1,) and last.item() < first.item()


def test_bad_engine_settings_are_errors():
    m = tiny_etmae()
    opt = optimizer_for(m, "fused")
    with pytest.raises(ValueError, match="engine.mode"):
        TrainStep(m, opt, mode="fast")
    with pytest.raises(ValueError, match="engine.amp"):
        TrainStep(m, opt, amp="int8")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        TrainStep(m, opt, amp="fp16", device="cpu")


@pytest.mark.cuda
def test_fused_step_never_syncs_the_host_on_cuda():
    model = tiny_etmae().cuda()
    step = TrainStep(model, optimizer_for(model, "fused"), mode="fused", amp="bf16")
    imgs = torch.randn(4, 1, 16, 16, device="cuda")
    step(imgs)  # warm-up (allocations)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(imgs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- compile

@pytest.mark.slow
def test_compiled_step_equals_eager_and_never_recompiles():
    """torch.compile (inductor) of a tiny ETMAE step: same losses and weights as eager within bf16
    tolerance, one compilation, and steps 2..N reuse it (error_on_recompile)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    # one block each: compile time grows with the graph, and one block shows the same fusions
    eager_m, comp_m = tiny_etmae(depth=1), tiny_etmae(depth=1)
    eager = TrainStep(eager_m, sgd(eager_m), mode="fused", amp="bf16", compile=False)
    comp = TrainStep(comp_m, sgd(comp_m), mode="fused", amp="bf16", compile=True)
    imgs, _ = batch()
    te = eager(imgs)
    tc = comp(imgs)  # compiles
    assert torch.allclose(te, tc, rtol=2e-2, atol=2e-3), (te, tc)
    frames = counters["stats"]["unique_graphs"]
    assert frames >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):  # new images, new masks, new lr: same graph
            imgs, _ = batch(seed=10 + i)
            te = eager(imgs)
            tc = comp(imgs)
            assert torch.allclose(te, tc, rtol=3e-2, atol=3e-3), (i, te, tc)
    assert counters["stats"]["unique_graphs"] == frames
    for (n, p), q in zip(eager_m.named_parameters(), comp_m.parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, rtol=2e-2, atol=2e-3), n


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    from fasttrain.train.dist import DistInfo, wrap_ddp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_etmae()
    info = DistInfo(rank=rank, world_size=world, device=torch.device("cpu"))
    ddp = wrap_ddp(model, info)
    step = TrainStep(model, sgd(model), mode="fused", amp="fp32", ddp=ddp, rank=rank)
    imgs, noise = batch(n=8)
    b = 8 // world
    for _ in range(3):
        step(imgs[rank * b:(rank + 1) * b], noise=noise[rank * b:(rank + 1) * b])
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_rank(tmp_path):
    import torch.multiprocessing as mp
    one = tiny_etmae()
    step = TrainStep(one, sgd(one), mode="fused", amp="fp32")
    imgs, noise = batch(n=8)
    for _ in range(3):
        step(imgs, noise=noise)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out)
    ref = one.state_dict()
    assert set(two) == set(ref) and not any(k.startswith("teacher.") for k in two)
    moved = 0
    for k, v in ref.items():
        assert torch.allclose(v, two[k], rtol=1e-4, atol=1e-6), k
        moved += int(not torch.equal(v, tiny_etmae().state_dict()[k]))
    assert moved > 10  # the comparison is between trained weights, not two inits


def test_compile_failure_names_the_way_out(monkeypatch):
    import torch._dynamo.exc as dexc
    from fasttrain.train.engine import CompileError

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise dexc.Unsupported("graph break in a custom op")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    m = tiny_etmae()
    step = TrainStep(m, optimizer_for(m, "fused"), mode="fused", compile=True)
    with pytest.raises(CompileError, match="engine.compile=false"):
        step(batch()[0])


def test_amp_auto_is_bf16_only_where_it_is_native(monkeypatch):
    """engine.amp=auto: bf16 on CUDA and on CPUs with native bf16; fp32 where oneDNN would emulate it
    (both CPU kinds simulated: this machine is one of them)."""
    from fasttrain.data import gpu_augment
    from fasttrain.train.engine import amp_dtype_for
    for native in (True, False):
        monkeypatch.setattr(gpu_augment, "cpu_has_native_bf16", lambda: native)
        assert amp_dtype_for("auto", "cuda") == torch.bfloat16
        assert amp_dtype_for("auto", "cpu") == (torch.bfloat16 if native else None), native
    assert amp_dtype_for("bf16", "cpu") == torch.bfloat16 and amp_dtype_for("fp32", "cpu") is None
    with pytest.raises(ValueError, match="engine.amp"):
        amp_dtype_for("int8", "cpu")
