"""Models: registry shapes, MAE stages against hand computations, ETMAE distillation, classifier."""
import math

import numpy as np
import pytest
import timm
import torch

from fasttrain.models import ETMAE, ViTClassifier, create_model, list_models
from fasttrain.models.classifier import param_groups_layer_decay
from fasttrain.models.vit import sincos_pos_embed_2d

TINY = dict(img_size=32, patch_size=8, depth=4, decoder_depth=1)  # L = 16 patches


def tiny_mae(**kw):
    args = dict(TINY, in_chans=1)
    args.update(kw)
    return create_model("mae_vit_tiny_patch16", **args)


def tiny_teacher(**kw):
    args = dict(TINY, in_chans=1, embed_dim=96, num_heads=4)
    args.update(kw)
    return create_model("mae_vit_small_patch16", **args)


# ----------------------------------------------------------------------------- registry

def test_registry_names_and_errors():
    assert set(list_models()) == {
        "mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16",
        "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16"}
    with pytest.raises(ValueError, match="mae_vit_small_patch16") as e:
        create_model("mae_vit_huge_patch14")
    assert "vit_base_patch16" in str(e.value)
    with pytest.raises(ValueError, match="decoder_widht"):
        create_model("mae_vit_tiny_patch16", decoder_widht=3)
    with pytest.raises(ValueError, match="in_chans"):
        create_model("mae_vit_tiny_patch16", in_chans=2, **TINY)


# (name, timm twin, heads, decoder depth, exact encoder parameter count)
REAL = [
    ("mae_vit_tiny_patch16", "vit_tiny_patch16_224", 3, 2, 5_524_416),
    ("mae_vit_small_patch16", "vit_small_patch16_224", 6, 2, 21_665_664),
    ("mae_vit_base_patch16", "vit_base_patch16_224", 12, 8, 85_798_656),
]


def expected_decoder_shapes(D, Dd, depth, L, p, c):
    """The MAE decoder layout, written out from the MAE / Xiao et al. checkpoint format."""
    s = {"decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
         "decoder_pos_embed": (1, 1 + L, Dd), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
         "decoder_pred.weight": (p * p * c, Dd), "decoder_pred.bias": (p * p * c,)}
    for i in range(depth):
        b = f"decoder_blocks.{i}."
        s.update({b + "norm1.weight": (Dd,), b + "norm1.bias": (Dd,), b + "attn.qkv.weight": (3 * Dd, Dd),
                  b + "attn.qkv.bias": (3 * Dd,), b + "attn.proj.weight": (Dd, Dd), b + "attn.proj.bias": (Dd,),
                  b + "norm2.weight": (Dd,), b + "norm2.bias": (Dd,), b + "mlp.fc1.weight": (4 * Dd, Dd),
                  b + "mlp.fc1.bias": (4 * Dd,), b + "mlp.fc2.weight": (Dd, 4 * Dd), b + "mlp.fc2.bias": (Dd,)})
    return s


@pytest.mark.parametrize("name,timm_name,heads,ddepth,n_enc", REAL)
def test_real_registry_shapes_match_timm_and_mae_layout(name, timm_name, heads, ddepth, n_enc):
    m = create_model(name)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # encoder: exactly timm's VisionTransformer state dict (keys and shapes), the independent oracle
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = {k: tuple(v.shape) for k, v in timm.create_model(timm_name, num_classes=0).state_dict().items()}
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    assert enc == ref
    assert sum(math.prod(s) for s in enc.values()) == n_enc
    D = m.embed_dim
    dec = {k: v for k, v in sd.items() if k.startswith(("decoder_", "mask_token"))}
    assert dec == expected_decoder_shapes(D, 512, ddepth, 196, 16, 3)
    assert all(b.attn.num_heads == heads for b in m.blocks)
    assert all(b.attn.num_heads == 16 for b in m.decoder_blocks)
    assert (m.patch_size, m.num_patches, m.depth, m.in_chans) == (16, 196, 12, 3)
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(m.pos_embed, sincos_pos_embed_2d(D, 14))
    cls = create_model(name[len("mae_"):], num_classes=5)
    assert cls.head.weight.shape == (5, D) and cls.blocks[0].attn.num_heads == heads


def test_sincos_table_hand_values():
    D, g = 16, 3
    pe = sincos_pos_embed_2d(D, g)[0]  # [1+9, D]
    assert torch.all(pe[0] == 0)  # cls slot
    for h in range(g):
        for w in range(g):
            row = pe[1 + h * g + w]
            # channel 0: sin(w * omega_0) with omega_0 = 1; D/4: cos(w); D/2: sin(h); 3D/4: cos(h)
            assert row[0].item() == pytest.approx(math.sin(w), abs=1e-6)
            assert row[D // 4].item() == pytest.approx(math.cos(w), abs=1e-6)
            assert row[D // 2].item() == pytest.approx(math.sin(h), abs=1e-6)
            assert row[3 * D // 4].item() == pytest.approx(math.cos(h), abs=1e-6)
            # channel 1: sin(w / 10000^(1/(D/4)))
            assert row[1].item() == pytest.approx(math.sin(w / 10000 ** (1 / (D / 4))), abs=1e-6)


# ----------------------------------------------------------------------------- MAE stages

def test_patchify_layout_and_roundtrip():
    m = tiny_mae(in_chans=3)
    x = torch.randn(2, 3, 32, 32)
    pt = m.patchify(x)
    assert pt.shape == (2, 16, 8 * 8 * 3)
    p, gw = 8, 4
    for (n, i, j, r, c, ch) in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 5, 7, 2), (0, 3, 1, 7, 0, 1)]:
        assert pt[n, i * gw + j, (r * p + c) * 3 + ch] == x[n, ch, i * p + r, j * p + c]
    assert torch.equal(m.unpatchify(pt), x)


def mae_masking_reference(noise, mask_ratio):
    """MAE's random_masking, transcribed step by step in numpy."""
    N, L = noise.shape
    K = int(L * (1 - mask_ratio))
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
    mask = np.ones((N, L))
    mask[:, :K] = 0
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return ids_shuffle[:, :K], ids_restore, mask, ids_shuffle


@pytest.mark.parametrize("N,L,ratio", [(3, 16, 0.75), (2, 196, 0.75), (4, 49, 0.5), (1, 11, 0.9), (2, 16, 0.0)])
def test_random_masking_invariants(N, L, ratio):
    m = tiny_mae()
    noise = torch.rand(N, L)
    ids_keep, ids_restore, mask = m.random_masking(N, L, ratio, noise=noise)
    K = int(L * (1 - ratio))
    assert ids_keep.shape == (N, K) and ids_restore.shape == (N, L) and mask.shape == (N, L)
    assert torch.all(mask.sum(1) == L - K)
    for n in range(N):
        assert len(set(ids_keep[n].tolist())) == K  # distinct
        assert torch.all(mask[n, ids_keep[n]] == 0)  # kept patches are 0 in the mask
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))  # inverse
    assert torch.equal(ids_keep, ids_shuffle[:, :K])
    rk, rr, rm, _ = mae_masking_reference(noise.numpy(), ratio)
    assert np.array_equal(ids_keep.numpy(), rk) and np.array_equal(ids_restore.numpy(), rr)
    assert np.array_equal(mask.numpy(), rm)
    # same noise, same mask; the kept patches are those with the smallest noise
    assert torch.equal(m.random_masking(N, L, ratio, noise=noise.clone()).ids_keep, ids_keep)
    assert torch.all(noise.gather(1, ids_keep).max(1).values <= noise.masked_fill(mask == 0, 2).min(1).values)


def test_random_masking_errors():
    m = tiny_mae()
    with pytest.raises(ValueError, match="noise"):
        m.random_masking(2, 16, 0.75, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="keeps no patch"):
        m.random_masking(2, 3, 0.9)


def manual_encoder(m, x, ids_keep, upto=None):
    """The MAE encoder with plain indexing loops (independent of kernels.masked_gather)."""
    tok = m.patch_embed(x) + m.pos_embed[:, 1:]  # [N, L, D]
    vis = torch.stack([tok[n, ids_keep[n]] for n in range(x.shape[0])])  # [N, K, D]
    h = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1), vis], 1)
    outs = []
    for blk in m.blocks[: (upto + 1 if upto is not None else len(m.blocks))]:
        h = blk(h)
        outs.append(h)
    return h, outs


def test_forward_encoder_equals_manual_and_returns_blocks():
    torch.manual_seed(0)
    m = tiny_mae().eval()
    x = torch.randn(3, 1, 32, 32)
    noise = torch.rand(3, 16)
    out = m.forward_encoder(x, noise=noise, return_blocks=(0, 2))
    ids_keep = torch.argsort(noise, 1)[:, :4]
    h, outs = manual_encoder(m, x, ids_keep)
    assert out.latent.shape == (3, 5, 192)
    torch.testing.assert_close(out.latent, m.norm(h))
    assert set(out.feats) == {0, 2}
    torch.testing.assert_close(out.feats[0], outs[0])
    torch.testing.assert_close(out.feats[2], outs[2])
    assert torch.equal(out.ids_keep, ids_keep)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_encoder(x, noise=noise, return_blocks=(4,))


def test_unmasked_encoder_equals_forward_features():
    # attention is permutation-equivariant: with mask_ratio 0 the shuffled encoder, un-shuffled,
    # is the full encoder
    torch.manual_seed(1)
    m = tiny_mae().eval()
    x = torch.randn(2, 1, 32, 32)
    out = m.forward_encoder(x, mask_ratio=0.0)
    unshuf = torch.gather(out.latent[:, 1:], 1, out.ids_restore[..., None].expand(-1, -1, 192))
    full = m.forward_features(x)
    assert full.shape == (2, 17, 192)
    torch.testing.assert_close(unshuf, full[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latent[:, :1], full[:, :1], atol=1e-5, rtol=1e-5)


def test_forward_decoder_equals_manual():
    torch.manual_seed(2)
    m = tiny_mae(decoder_depth=2).eval()
    x = torch.randn(2, 1, 32, 32)
    out = m.forward_encoder(x)
    pred = m.forward_decoder(out.latent, out.ids_restore)
    assert pred.shape == (2, 16, 64)
    y = m.decoder_embed(out.latent)  # [N, 1+K, Dd]
    K = out.latent.shape[1] - 1
    rows = []
    for n in range(2):
        seq = [y[n, 0]]
        for l in range(16):
            r = out.ids_restore[n, l].item()
            seq.append(y[n, 1 + r] if r < K else m.mask_token[0, 0])
        rows.append(torch.stack(seq))
    h = torch.stack(rows) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        h = blk(h)
    ref = m.decoder_pred(m.decoder_norm(h))[:, 1:]
    torch.testing.assert_close(pred, ref)


def test_mae_forward_loss_is_masked_mse_of_patches():
    torch.manual_seed(3)
    m = tiny_mae(norm_pix_loss=True)
    x = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = m(x, noise=noise)
    target = m.patchify(x).double()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per = ((pred.double() - target) ** 2).mean(-1)
    ref = (per * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None
    assert m.pos_embed.grad is None and all(p is not m.pos_embed for p in m.trainable_parameters())


# ----------------------------------------------------------------------------- ETMAE

def make_etmae(student_blocks=(2,), teacher_blocks=(1,), **kw):
    torch.manual_seed(4)
    return ETMAE(tiny_mae(), tiny_teacher(), student_blocks, teacher_blocks, **kw)


def test_truncated_teacher_features_equal_full_teacher_block():
    e = make_etmae(teacher_blocks=(1,))
    x = torch.randn(2, 1, 32, 32)
    masking = e.student.random_masking(2, 16, 0.75, noise=torch.rand(2, 16))
    feats = e.teacher_features(x, masking.ids_keep)
    full = e.teacher.forward_encoder(x, masking=masking, return_blocks=(1,))
    assert feats[1].shape == (2, 5, 96)
    torch.testing.assert_close(feats[1], full.feats[1], rtol=0, atol=0)
    _, outs = manual_encoder(e.teacher, x, masking.ids_keep)
    torch.testing.assert_close(feats[1], outs[1])
    # truncation: blocks after the aligned one never run
    ran = []
    hooks = [b.register_forward_hook(lambda mod, i, o, k=k: ran.append(k)) for k, b in enumerate(e.teacher.blocks)]
    e.teacher_features(x, masking.ids_keep)
    assert ran == [0, 1]
    for h in hooks:
        h.remove()


def test_distill_loss_equals_eq2_and_total():
    e = make_etmae(alpha=0.7)
    x = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    out = e(x, noise=noise)
    ids_keep = torch.argsort(noise, 1)[:, :4]
    _, s_outs = manual_encoder(e.student, x, ids_keep)
    _, t_outs = manual_encoder(e.teacher, x, ids_keep)
    s = e.proj[0](s_outs[2]).detach().double()  # [N, 1+K, Dt] cls included
    t = t_outs[1].detach().double()
    ref = ((s / s.norm(dim=-1, keepdim=True)) - (t / t.norm(dim=-1, keepdim=True))).abs().mean()
    assert out.loss_dist.item() == pytest.approx(ref.item(), rel=1e-5)
    loss_mae, _, _ = e.student(x, noise=noise)
    assert out.loss_mae.item() == pytest.approx(loss_mae.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.loss_mae.item() + 0.7 * out.loss_dist.item(), rel=1e-6)
    assert out.pred.shape == (2, 16, 64) and out.mask.shape == (2, 16)


def test_teacher_mode_full_equals_truncated():
    e = make_etmae()
    x = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    a = e(x, noise=noise, teacher_mode="truncated")
    b = e(x, noise=noise, teacher_mode="full")
    for f in ("loss", "loss_mae", "loss_dist", "pred", "mask"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)
    with pytest.raises(ValueError, match="teacher_mode"):
        e(x, teacher_mode="half")


def test_no_gradient_reaches_the_teacher():
    e = make_etmae()
    e.train()
    assert not e.teacher.training and e.student.training  # teacher stays in eval
    x = torch.randn(2, 1, 32, 32)
    out = e(x)
    out.loss.backward()
    assert all(p.grad is None for p in e.teacher.parameters())
    assert all(not p.requires_grad for p in e.teacher.parameters())
    assert e.proj[0].weight.grad is not None and e.student.blocks[0].attn.qkv.weight.grad is not None
    # blocks after the aligned student block get gradients only from the MAE loss; all get some
    assert e.student.blocks[3].mlp.fc2.weight.grad is not None
    names = {id(p) for p in e.teacher.parameters()}
    tp = e.trainable_parameters()
    assert not any(id(p) in names for p in tp)
    assert len(tp) == sum(1 for p in list(e.student.parameters()) + list(e.proj.parameters()) if p.requires_grad)


def test_distill_gradient_of_loss_dist_matches_finite_difference_direction():
    # the distillation term alone drives the projection and the student blocks up to the aligned one
    e = make_etmae(student_blocks=(1,))
    x = torch.randn(2, 1, 32, 32)
    out = e(x)
    out.loss_dist.backward()
    assert e.student.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert e.student.blocks[2].attn.qkv.weight.grad is None  # after the aligned block: no L_dist gradient
    assert e.student.decoder_pred.weight.grad is None


def test_multiple_block_pairs_and_mlp_projection():
    e = make_etmae(student_blocks=(1, 3), teacher_blocks=(0, 2), proj="mlp")
    x = torch.randn(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    out = e(x, noise=noise)
    m = e.student.random_masking(2, 16, 0.75, noise=noise)
    s = e.student.forward_encoder(x, masking=m, return_blocks=(1, 3)).feats
    t = e.teacher.forward_encoder(x, masking=m, return_blocks=(0, 2)).feats
    from fasttrain.losses import feature_align_l1
    ref = (feature_align_l1(e.proj[0](s[1]), t[0]) + feature_align_l1(e.proj[1](s[3]), t[2])) / 2
    assert out.loss_dist.item() == pytest.approx(ref.item(), rel=1e-6)
    assert len(e.proj[0]) == 3  # Linear, GELU, Linear
    with pytest.raises(ValueError, match="same length"):
        ETMAE(tiny_mae(), tiny_teacher(), [1, 2], [1])
    with pytest.raises(ValueError, match="teacher block 4 out of range"):
        ETMAE(tiny_mae(), tiny_teacher(), [1], [4])
    with pytest.raises(ValueError, match="projection"):
        ETMAE(tiny_mae(), tiny_teacher(), proj="conv", student_blocks=[1], teacher_blocks=[1])


def test_incompatible_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="patch size 16"):
        ETMAE(tiny_mae(), tiny_teacher(patch_size=16), [1], [1])
    with pytest.raises(ValueError, match="img_size 64"):
        ETMAE(tiny_mae(), tiny_teacher(img_size=64), [1], [1])
    with pytest.raises(ValueError, match="in_chans 1"):
        ETMAE(tiny_mae(in_chans=3), tiny_teacher(in_chans=1), [1], [1])


def test_rgb_teacher_on_gray_student_equals_channel_summed_teacher():
    torch.manual_seed(5)
    t3 = tiny_teacher(in_chans=3)
    t1 = tiny_teacher(in_chans=1)
    sd = t3.state_dict()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].sum(1, keepdim=True)
    sd["decoder_pred.weight"] = t1.state_dict()["decoder_pred.weight"]
    sd["decoder_pred.bias"] = t1.state_dict()["decoder_pred.bias"]
    t1.load_state_dict(sd)
    e3 = ETMAE(tiny_mae(), t3, [1], [1])
    x = torch.randn(2, 1, 32, 32)
    ids_keep = torch.argsort(torch.rand(2, 16), 1)[:, :4]
    a = e3.teacher_features(x, ids_keep)[1]
    _, outs = manual_encoder(t1, x, ids_keep)
    torch.testing.assert_close(a, outs[1], atol=1e-5, rtol=1e-5)


def test_etmae_state_dict_excludes_teacher_and_reloads_strictly():
    e = make_etmae()
    sd = e.state_dict()
    assert sd and all(k.startswith(("student.", "proj.")) for k in sd)
    e2 = make_etmae()
    e2.load_state_dict(sd, strict=True)  # the teacher keys are not required
    for k, v in e2.state_dict().items():
        assert torch.equal(v, sd[k])
    e3 = ETMAE(tiny_mae(), tiny_teacher(), [2], [1], save_teacher=True)
    assert any(k.startswith("teacher.") for k in e3.state_dict())


def test_etmae_runs_under_bf16_autocast_and_with_bf16_teacher():
    e = make_etmae()
    e.teacher.to(torch.bfloat16)
    x = torch.randn(2, 1, 32, 32)
    out = e(x)  # autocast off: the input is cast to the teacher's dtype
    assert torch.isfinite(out.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = e(x)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


# ----------------------------------------------------------------------------- classifier

def test_classifier_forward_and_init():
    torch.manual_seed(6)
    c = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, in_chans=1, num_classes=5,
                     drop_path_rate=0.2)
    assert isinstance(c, ViTClassifier) and not hasattr(c, "norm")
    assert c.pos_embed.requires_grad  # learnable in fine-tuning
    assert c.head.weight.std().item() < 1e-4 and torch.all(c.head.bias == 0)
    assert c.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)  # linear in depth, 0 at block 0
    assert isinstance(c.blocks[0].drop_path1, torch.nn.Identity)
    c.eval()
    x = torch.randn(3, 1, 32, 32)
    logits = c(x)
    assert logits.shape == (3, 5)
    tok = c.forward_tokens(x)
    torch.testing.assert_close(logits, c.head(c.fc_norm(tok[:, 1:].mean(1))))


def test_layer_decay_groups():
    c = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=3, num_classes=4)
    ld, wd = 0.5, 0.05
    groups = param_groups_layer_decay(c, weight_decay=wd, layer_decay=ld)
    where = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in where
            where[id(p)] = g
    named = dict(c.named_parameters())
    assert len(where) == len(named)  # every parameter exactly once

    def g_of(n):
        return where[id(named[n])]

    # depth 3: embeddings layer 0 -> ld^4, blocks.i -> ld^(3-i), head/fc_norm -> 1
    assert g_of("patch_embed.proj.weight")["lr_scale"] == pytest.approx(ld ** 4)
    assert g_of("cls_token")["lr_scale"] == pytest.approx(ld ** 4)
    assert g_of("pos_embed")["lr_scale"] == pytest.approx(ld ** 4)
    assert g_of("blocks.0.attn.qkv.weight")["lr_scale"] == pytest.approx(ld ** 3)
    assert g_of("blocks.2.mlp.fc1.weight")["lr_scale"] == pytest.approx(ld ** 1)
    assert g_of("head.weight")["lr_scale"] == 1.0 and g_of("fc_norm.weight")["lr_scale"] == 1.0
    for n in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"):
        assert g_of(n)["weight_decay"] == wd, n
    for n in ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
              "fc_norm.weight", "fc_norm.bias", "head.bias"):
        assert g_of(n)["weight_decay"] == 0.0, n
    opt = torch.optim.AdamW(groups, lr=1e-3)  # valid torch param groups
    assert len(opt.param_groups) == len(groups)


def test_paper_pair_vit_t_student_vit_b_teacher_at_224():
    # the paper's ViT-B -> ViT-T setting at its real shapes (one forward each way, batch 2)
    torch.manual_seed(7)
    student = create_model("mae_vit_tiny_patch16", in_chans=1)
    teacher = create_model("mae_vit_base_patch16", in_chans=1)
    e = ETMAE(student, teacher)  # defaults: block 8 of 12 on both sides, linear 192 -> 768
    assert e.student_blocks == [8] and e.teacher_blocks == [8] and e.proj[0].weight.shape == (768, 192)
    x = torch.randn(2, 1, 224, 224)
    noise = torch.rand(2, 196)
    ran = []
    hooks = [b.register_forward_hook(lambda mod, i, o, k=k: ran.append(k)) for k, b in enumerate(teacher.blocks)]
    with torch.no_grad():
        a = e(x, noise=noise)
        assert ran == list(range(9))  # 9 of 12 teacher blocks
        b = e(x, noise=noise, teacher_mode="full")
    for h in hooks:
        h.remove()
    assert a.pred.shape == (2, 196, 256) and a.mask.sum().item() == 2 * 147
    torch.testing.assert_close(a.loss_dist, b.loss_dist, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert 0 < a.loss_dist.item() < 2 and torch.isfinite(a.loss)


# ----------------------------------------------------------------------------- fast paths beside their plain twins

def _attn_pair(dim=64, heads=4):
    """Our Attention and timm's, same weights."""
    from timm.layers import Attention as TimmAttention

    from fasttrain.models.vit import Attention
    torch.manual_seed(11)
    ours = Attention(dim, num_heads=heads, qkv_bias=True)
    ref = TimmAttention(dim, num_heads=heads, qkv_bias=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def test_attention_equals_timm_without_autocast_and_under_no_grad():
    ours, ref = _attn_pair()
    x = torch.randn(3, 17, 64)  # odd token count
    assert torch.equal(ours(x), ref(x))  # fp32: the very same ops
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # teacher-like: stays bf16
        assert torch.equal(ours(x), ref(x))
    ours.upcast_cpu = False  # the switch gives timm's path under autocast + grad too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), ref(x))


def test_attention_cpu_upcast_under_autocast_matches_fp32_in_value_and_gradient():
    from fasttrain.models.vit import upcast_attention_here
    ours, ref = _attn_pair()
    x = torch.randn(2, 50, 64)
    x32, xbf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y32 = ref(x32)  # fp32 oracle
    g = torch.randn_like(y32)
    y32.backward(g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upcast_attention_here(ours.qkv(xbf))  # the fast path is what runs below
        y = ours(xbf)
    assert y.dtype == torch.bfloat16  # same output dtype as timm under autocast
    y.float().backward(g)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(xbf.grad, x32.grad, atol=3e-2, rtol=3e-2)
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
        # bf16 matmul gradients summed over 100 tokens: bf16 tolerance relative to the norm
        assert (p_ours.grad - p_ref.grad).norm() <= 2e-2 * p_ref.grad.norm()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not upcast_attention_here(ours.qkv(x))  # frozen teacher: no upcast


def test_models_use_the_upcasting_attention():
    from fasttrain.models.vit import Attention
    m = tiny_mae()
    assert all(type(b.attn) is Attention for b in list(m.blocks) + list(m.decoder_blocks))
    c = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, in_chans=1)
    assert all(type(b.attn) is Attention for b in c.blocks)


def test_attention_and_block_at_query_subset_equal_full_then_gather():
    from fasttrain.models.vit import block_at, gather_tokens, make_block
    torch.manual_seed(12)
    blk = make_block(64, 4)
    x = torch.randn(3, 23, 64)  # prime token count
    idx = torch.stack([torch.randperm(23)[:7] for _ in range(3)])  # [3, 7] arbitrary order
    full = gather_tokens(blk(x), idx)  # plain twin
    torch.testing.assert_close(block_at(blk, x, idx), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blk.attn(x, query_index=idx), gather_tokens(blk.attn(x), idx), atol=1e-5, rtol=1e-5)
    blk.attn.upcast_cpu = False  # timm's path: select after the full block, same values
    torch.testing.assert_close(block_at(blk, x, idx), full, atol=1e-5, rtol=1e-5)
    blk.attn.upcast_cpu = True
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training path (upcast attention)
        ya = block_at(blk, xa, idx)
        yb = gather_tokens(blk(xb), idx)
    torch.testing.assert_close(ya.float(), yb.float(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(ya.float())
    ya.float().backward(g)
    yb.float().backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("decoder_depth", [0, 1, 2])
def test_forward_decoder_masked_equals_full_decoder_at_removed_patches(decoder_depth):
    torch.manual_seed(13)
    m = tiny_mae(decoder_depth=decoder_depth)
    x = torch.randn(3, 1, 32, 32)
    enc = m.forward_encoder(x, noise=torch.rand(3, 16))
    ids_masked = m.masked_indices(enc.ids_restore, enc.ids_keep.shape[1])  # [3, 12]
    assert ids_masked.shape == (3, 12)
    assert torch.equal(enc.mask.gather(1, ids_masked), torch.ones(3, 12))  # exactly the removed patches
    assert torch.equal(enc.mask.sum(1), torch.full((3,), 12.0))
    full = m.forward_decoder(enc.latent, enc.ids_restore)  # [3, 16, 64]
    fast = m.forward_decoder_masked(enc.latent, enc.ids_restore, ids_masked)  # [3, 12, 64]
    torch.testing.assert_close(fast, full.gather(1, ids_masked.unsqueeze(-1).expand(-1, -1, 64)),
                               atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, x, noise, **kw):
    model.zero_grad(set_to_none=True)
    out = model(x, noise=noise, **kw)
    loss = out[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("decoder_depth", [1, 2])
def test_mae_and_etmae_masked_decoder_give_the_same_losses_and_gradients(decoder_depth):
    x, noise = torch.randn(2, 1, 32, 32), torch.rand(2, 16)
    m = tiny_mae(decoder_depth=decoder_depth)
    (l_full, p_full, mask_full), g_full = _loss_and_grads(m, x, noise)
    (l_fast, p_fast, mask_fast), g_fast = _loss_and_grads(m, x, noise, decoder="masked")
    torch.testing.assert_close(l_fast, l_full, atol=1e-6, rtol=1e-5)
    assert p_full.shape == (2, 16, 64) and p_fast.shape == (2, 12, 64) and torch.equal(mask_fast, mask_full)
    assert g_fast.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], atol=1e-6, rtol=1e-4, msg=n)

    e = make_etmae()
    out_full, g_full = _loss_and_grads(e, x, noise)
    out_fast, g_fast = _loss_and_grads(e, x, noise, decoder="masked")
    for a, b in [(out_fast.loss, out_full.loss), (out_fast.loss_mae, out_full.loss_mae),
                 (out_fast.loss_dist, out_full.loss_dist)]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert g_fast.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], atol=1e-6, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="decoder mode 'fast'"):
        e(x, noise=noise, decoder="fast")
    with pytest.raises(ValueError, match="decoder mode"):
        m(x, noise=noise, decoder="visible")
