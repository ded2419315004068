"""Checkpoints: Xiao-layout teachers load strictly, wrong sizes fail naming keys, conversions, export."""
import argparse
import json
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fasttrain.config import build_config
from fasttrain.data.gpu_augment import norm_stats
from fasttrain.models import ETMAE, create_model
from fasttrain.models.checkpoints import (CheckpointError, convert_in_chans, export_timm, load_encoder, load_into,
                                          load_mae, load_teacher, read_checkpoint, read_state_dict)
from fasttrain.models.vit import sincos_pos_embed_2d
from fasttrain.train.builders import build_pretrain_model, init_classifier
from fasttrain.train.checkpoint import save_atomic


@pytest.fixture(scope="module")
def xiao_s(tmp_path_factory, xiao_layout, synth_state, save_mae_style):
    sd = synth_state(xiao_layout(384, 12, 512, 2), seed=1)
    path = save_mae_style(tmp_path_factory.mktemp("ck") / "vit-s_CXR_0.3M_mae.pth", sd, "mae_vit_small_patch16",
                          prefix="module.")
    return path, sd


@pytest.fixture(scope="module")
def xiao_b(tmp_path_factory, xiao_layout, synth_state, save_mae_style):
    sd = synth_state(xiao_layout(768, 12, 512, 8), seed=2)
    path = save_mae_style(tmp_path_factory.mktemp("ck") / "vit-b_CXR_0.5M_mae.pth", sd, "mae_vit_base_patch16")
    return path, sd


def assert_loaded(model, sd, keys=None):
    msd = model.state_dict()
    for k in keys if keys is not None else sd:
        assert torch.equal(msd[k], sd[k]), k


# ----------------------------------------------------------------------------- Xiao-layout teachers

def test_xiao_s_loads_strictly_into_mae_small_and_as_teacher(xiao_s):
    path, sd = xiao_s
    m = load_mae("mae_vit_small_patch16", path)  # `module.` prefixes stripped, args Namespace allowed
    assert m.load_report.ok and len(m.load_report.loaded) == len(sd) == len(m.state_dict())
    assert_loaded(m, sd)
    t = load_teacher("mae_vit_small_patch16", path, img_size=224, in_chans=3)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    enc_keys = [k for k in sd if not k.startswith(("decoder_", "mask_token"))]
    assert_loaded(t, sd, enc_keys)
    assert sorted(t.load_report.ignored) == sorted(k for k in sd if k.startswith(("decoder_", "mask_token")))
    assert not t.load_report.missing and not t.load_report.unexpected


def test_xiao_b_loads_strictly_into_mae_base_and_as_teacher(xiao_b, caplog):
    path, sd = xiao_b
    m = load_mae("mae_vit_base_patch16", path)
    assert m.load_report.ok and len(m.load_report.loaded) == len(sd)
    assert_loaded(m, sd)
    del m
    with caplog.at_level(logging.WARNING):
        t = load_teacher("mae_vit_base_patch16", path, img_size=224, in_chans=3)
    # one line says what happened to the decoder; its keys are not listed again as "left at init"
    assert f"loaded 150 encoder tensors; ignored its {sum(k.startswith(('decoder_', 'mask_token')) for k in sd)} " \
           "decoder keys" in caplog.text
    assert "left at init" not in caplog.text and "decoder_blocks.0" not in caplog.text
    assert_loaded(t, sd, [k for k in sd if k.startswith("blocks.11.")] + ["cls_token", "patch_embed.proj.weight"])


def test_b_checkpoint_into_s_fails_naming_keys(xiao_b):
    path, _ = xiao_b
    with pytest.raises(CheckpointError) as e:
        load_mae("mae_vit_small_patch16", path)
    msg = str(e.value)
    assert str(path) in msg
    assert "blocks.0.attn.qkv.weight: checkpoint [2304, 768] vs model [1152, 384]" in msg
    assert "unexpected keys" in msg and "decoder_blocks.7.mlp.fc2.bias" in msg  # decoder 8 blocks vs 2
    assert "embed_dim 768" in msg and "embed_dim 384" in msg
    # what to do is said on the second line, before the long key list
    assert msg.splitlines()[1] == ("  -> a different model size: the checkpoint is a ViT-B "
                                   "(use mae_vit_base_patch16 / vit_base_patch16):")
    # as a teacher too, before any training
    with pytest.raises(CheckpointError, match="blocks.11.mlp.fc1.weight: checkpoint"):
        load_teacher("mae_vit_small_patch16", path, img_size=224, in_chans=3)


def test_missing_and_unexpected_keys_are_all_listed(tmp_path):
    m = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=3, in_chans=1)
    sd = m.state_dict()
    del sd["blocks.1.norm1.weight"], sd["norm.bias"]
    sd["blocks.3.norm1.weight"] = torch.zeros(192)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_into(create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=3, in_chans=1), path)
    msg = str(e.value)
    assert "bad.pt" in msg and "missing keys (2): " in msg and "blocks.1.norm1.weight" in msg and "norm.bias" in msg
    assert "unexpected keys (1): blocks.3.norm1.weight" in msg
    # non-strict: loads the rest and reports
    m2 = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=3, in_chans=1)
    rep = load_into(m2, path, strict=False)
    assert not rep.ok and set(rep.missing) == {"blocks.1.norm1.weight", "norm.bias"}
    assert rep.unexpected == ["blocks.3.norm1.weight"]
    assert torch.equal(m2.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


# ----------------------------------------------------------------------------- reading

class Opaque:
    pass


def test_read_formats_and_prefixes(tmp_path):
    t = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    assert read_state_dict(t).keys() == t.keys()
    assert read_state_dict({"model": {"module._orig_mod.a.weight": torch.ones(2)}}).keys() == {"a.weight"}
    assert read_state_dict({"state_dict": {"_orig_mod.module.b": torch.ones(2)}}).keys() == {"b"}
    save_file(t, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a.weight"], torch.ones(2))
    state, meta = read_checkpoint({"model": t, "args": argparse.Namespace(model="mae_vit_small_patch16")})
    assert meta["args_model"] == "mae_vit_small_patch16"
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="top-level keys"):
        read_state_dict({"epoch": 3, "weights": [1, 2]})
    torch.save({"model": t, "extra": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="pickled.pth.*allow_pickle=True"):
        read_state_dict(tmp_path / "pickled.pth")
    assert read_state_dict(tmp_path / "pickled.pth", allow_pickle=True).keys() == t.keys()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------- conversions

@pytest.mark.parametrize("c_from,c_to", [(3, 1), (1, 3)])
def test_in_chans_conversion(c_from, c_to, caplog, tiny_model):
    torch.manual_seed(0)
    src = tiny_model(in_chans=c_from).eval()
    dst = tiny_model(in_chans=c_to).eval()
    with caplog.at_level(logging.WARNING):
        rep = load_into(dst, src.state_dict(), what="rgb-or-gray")
    assert f"{c_from} -> {c_to} input channels" in caplog.text and rep.ok
    w = src.patch_embed.proj.weight
    expect = w.sum(1, keepdim=True) if c_to == 1 else w.repeat(1, 3, 1, 1) / 3
    torch.testing.assert_close(dst.patch_embed.proj.weight, expect)
    gray = torch.randn(2, 1, 32, 32)
    x_src = gray.expand(-1, c_from, -1, -1)
    x_dst = gray.expand(-1, c_to, -1, -1)
    # a gray image gives the same features in both models
    torch.testing.assert_close(dst.forward_features(x_dst), src.forward_features(x_src), atol=1e-5, rtol=1e-5)
    # and the decoder predicts the same gray pixels (RGB averaged / gray repeated)
    noise = torch.rand(2, 16)
    p_src = src(x_src, noise=noise)[1].reshape(2, 16, 64, c_from)
    p_dst = dst(x_dst, noise=noise)[1].reshape(2, 16, 64, c_to)
    torch.testing.assert_close(p_dst.mean(-1), p_src.mean(-1), atol=1e-5, rtol=1e-5)


def test_pos_embed_sincos_recomputed_for_new_grid(tiny_model):
    src = tiny_model(img_size=32)
    dst = tiny_model(img_size=64)  # 4x4 -> 8x8 grid
    rep = load_into(dst, src.state_dict())
    assert rep.ok and any("sin-cos table recomputed" in n for n in rep.notes)
    assert torch.equal(dst.pos_embed, sincos_pos_embed_2d(192, 8))
    assert torch.equal(dst.decoder_pos_embed, sincos_pos_embed_2d(512, 8))
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_learned_pos_embed_resampled_bicubic(tiny_model):
    torch.manual_seed(1)
    src = tiny_model("vit_tiny_patch16", img_size=32, num_classes=3)
    with torch.no_grad():
        src.pos_embed.normal_()  # learned (not a sin-cos table)
    dst = tiny_model("vit_tiny_patch16", img_size=64, num_classes=3)
    rep = load_into(dst, src.state_dict())
    assert rep.ok and any("resampled bicubic 4x4 -> 8x8" in n for n in rep.notes)
    grid = src.pos_embed[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 192)
    torch.testing.assert_close(dst.pos_embed[:, 1:], up, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # cls slot kept


# ----------------------------------------------------------------------------- our checkpoints, classifier

def test_student_read_from_our_etmae_checkpoint(tmp_path, tiny_model):
    torch.manual_seed(2)
    e = ETMAE(tiny_model(), tiny_model("mae_vit_small_patch16", embed_dim=96, num_heads=4), [1], [1])
    path = tmp_path / "last.pt"
    torch.save({"model": {"module." + k: v for k, v in e.state_dict().items()}, "step": 10}, path)
    # the whole ETMAE back, strictly
    e2 = ETMAE(tiny_model(), tiny_model("mae_vit_small_patch16", embed_dim=96, num_heads=4), [1], [1])
    assert load_into(e2, path).ok
    assert torch.equal(e2.proj[0].weight, e.proj[0].weight)
    # the student as an MAE, as a teacher, and as a classifier's encoder
    m = load_mae("mae_vit_tiny_patch16", path, img_size=32, patch_size=8, depth=2, decoder_depth=1, in_chans=1)
    assert_loaded(m, e.student.state_dict())
    t = load_teacher("mae_vit_tiny_patch16", path, img_size=32, in_chans=1, patch_size=8, depth=2, decoder_depth=1)
    assert torch.equal(t.blocks[1].attn.qkv.weight, e.student.blocks[1].attn.qkv.weight)
    c = tiny_model("vit_tiny_patch16", num_classes=5)
    rep = c.load_pretrained(path)
    assert "norm.weight" in rep.ignored and "decoder_pred.weight" in rep.ignored
    assert sorted(rep.left_at_init) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(c.pos_embed, e.student.pos_embed) and torch.equal(c.blocks[0].mlp.fc2.bias,
                                                                         e.student.blocks[0].mlp.fc2.bias)


def test_classifier_from_xiao_s(xiao_s):
    path, sd = xiao_s
    c = create_model("vit_small_patch16", num_classes=14, in_chans=1)
    rep = load_encoder(c, path)
    assert any("3 -> 1 input channels" in n for n in rep.notes)
    assert_loaded(c, sd, [k for k in sd if k.startswith("blocks.")] + ["cls_token", "pos_embed"])
    assert c.head.weight.std() < 1e-4  # head keeps its fresh init


def test_teacher_from_timm_state_dict_uses_its_learned_pos_embed():
    torch.manual_seed(3)
    tm = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, depth=2)
    t = load_teacher("mae_vit_tiny_patch16", tm.state_dict(), img_size=32, in_chans=3, patch_size=8, depth=2)
    assert "head.weight" in t.load_report.ignored
    assert torch.equal(t.pos_embed, tm.pos_embed)  # a learned table is the teacher's own, not sin-cos
    tm.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.forward_features(x), tm.forward_features(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("in_chans", [1, 3])
def test_export_timm_round_trip(tmp_path, in_chans):
    torch.manual_seed(4)
    student = create_model("mae_vit_tiny_patch16", in_chans=in_chans).eval()
    with torch.no_grad():  # make every tensor distinctive, so a swapped key would show
        for n, p in student.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    src = student
    if in_chans == 1:  # exporting through an ETMAE exports its student
        src = ETMAE(student, create_model("mae_vit_tiny_patch16", in_chans=1, depth=2), [1], [1])
    from safetensors.torch import load_file
    # default: timm's own default (3 channels), so the plain create_model call loads it as is
    path = export_timm(src, tmp_path / "student.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["timm_model"] == "vit_tiny_patch16_224" and json.loads(meta["timm_kwargs"])["in_chans"] == 3
    assert not any(k.startswith(("decoder", "mask_token")) for k in keys)
    tm = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)
    tm.load_state_dict(load_file(str(path)), strict=True)
    tm.eval()
    x = torch.randn(2, in_chans, 224, 224)
    x3 = x.expand(-1, 3, -1, -1) if in_chans == 1 else x  # a grey image as three equal channels
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x3), student.forward_features(x), atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind
    # in_chans=None keeps the model's own channels
    path = export_timm(src, tmp_path / "native.safetensors", in_chans=None)
    tm = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=in_chans, pretrained=False).eval()
    tm.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tm.forward_features(x), student.forward_features(x), atol=1e-5, rtol=1e-4)


def test_pos_embed_without_cls_slot_gets_a_zero_slot(tiny_model):
    torch.manual_seed(5)
    src = tiny_model("vit_tiny_patch16", num_classes=3)
    sd = src.state_dict()
    table = torch.randn(1, 16, 192)
    sd["pos_embed"] = table  # timm no_embed_class layout: positions for the patches only
    dst = tiny_model("vit_tiny_patch16", num_classes=3)
    rep = load_into(dst, sd)
    assert rep.ok and any("zero cls slot" in n for n in rep.notes)
    assert torch.equal(dst.pos_embed[:, 1:], table) and torch.all(dst.pos_embed[:, 0] == 0)


def test_export_errors(tmp_path, tiny_model):
    m = tiny_model()
    with pytest.raises(ValueError, match="safetensors"):
        export_timm(m, tmp_path / "student.pt")
    with pytest.raises(ValueError, match="final norm"):
        export_timm(tiny_model("vit_tiny_patch16", num_classes=2), tmp_path / "cls.safetensors")
    # a non-timm size still exports, with the timm kwargs to rebuild it in the metadata
    path = export_timm(torch.compile(m), tmp_path / "odd.safetensors", in_chans=None)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == ""
    import json
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    vt = VisionTransformer(**json.loads(meta["timm_kwargs"])).eval()
    vt.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vt.forward_features(x), m.eval().forward_features(x), atol=1e-5, rtol=1e-4)


def test_build_etmae_loads_teacher_strictly_and_fails_early(tmp_path):
    from fasttrain.models import build_etmae
    small = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1)
    t = create_model("mae_vit_small_patch16", in_chans=3, **small)
    path = tmp_path / "teacher.pth"
    torch.save({"model": t.state_dict()}, path)
    e = build_etmae("mae_vit_tiny_patch16", "mae_vit_small_patch16", teacher_ckpt=str(path), student_blocks=[1],
                    teacher_blocks=[1], teacher_overrides=dict(depth=2, decoder_depth=1), in_chans=1, **small)
    # 3-channel checkpoint into the gray student's teacher: patch weights summed
    torch.testing.assert_close(e.teacher.patch_embed.proj.weight, t.patch_embed.proj.weight.sum(1, keepdim=True))
    assert e.proj[0].weight.shape == (384, 192)
    with pytest.raises(CheckpointError, match="teacher.pth"):
        build_etmae("mae_vit_tiny_patch16", "mae_vit_base_patch16", teacher_ckpt=str(path), student_blocks=[1],
                    teacher_blocks=[1], teacher_overrides=dict(depth=2, decoder_depth=1), in_chans=1, **small)


def test_unreadable_files_say_why(tmp_path):
    """Garbage, a truncated download and a pickle of arbitrary objects each get their own message."""
    good = tmp_path / "good.pth"
    torch.save({"model": {"a": torch.ones(1000)}}, good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:2000])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=r"trunc.pth: unreadable checkpoint \(truncated or corrupt download\?\)"):
        read_state_dict(trunc)
    with pytest.raises(CheckpointError, match=r"junk.pth: not a readable PyTorch checkpoint \(corrupt or not a .pth"):
        read_state_dict(junk)
    obj = tmp_path / "obj.pth"
    torch.save({"model": {"a": torch.ones(2)}, "cfg": _Opaque()}, obj)
    with pytest.raises(CheckpointError, match=r"obj.pth: holds a \S*_Opaque object, which torch.load\(weights_only=True\) "
                                              r"refuses; if you trust the file, load it with allow_pickle=True"):
        read_state_dict(obj)
    assert list(read_state_dict(obj, allow_pickle=True)) == ["a"]


class _Opaque:
    pass


def test_teacher_from_encoder_only_checkpoint_logs_one_line(tmp_path, caplog):
    """Official MAE `mae_pretrain_vit_*.pth` / timm weights have no decoder: one line says so, the
    decoder's keys are not listed as missing."""
    m = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, in_chans=1)
    enc = {k: v for k, v in m.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    with caplog.at_level(logging.WARNING):
        t = load_teacher("mae_vit_tiny_patch16", tmp_path / "mae_pretrain.pth", img_size=32, in_chans=1,
                         patch_size=8, depth=2)
    assert t.load_report.ok and "it has no decoder" in caplog.text
    assert "left at init" not in caplog.text and "decoder_blocks.0" not in caplog.text


# ----------------------------------------------------------------------------- RGB <-> grey, normalised

def block_features(m, x: torch.Tensor, k: int) -> torch.Tensor:
    """Output of blocks[k] of the full (unmasked) encoder: [N, 1+L, D]."""
    t = m.patch_embed(x) + m.pos_embed[:, 1:]  # [N, L, D]
    t = torch.cat([m.embed_cls(t.shape[0]), t], dim=1)  # [N, 1+L, D]
    return m.run_blocks(t, [k], stop_after=k)[1][k]


def grey_inputs(n: int = 2, size: int = 32, seed: int = 0):
    """A grey image g in [0, 1] as the 3-channel model sees it (replicated, ImageNet mean/std per
    channel) and as the 1-channel model sees it ((g - 0.449) / 0.226)."""
    g = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    (m3, s3), (m1, s1) = norm_stats("imagenet", 3), norm_stats("imagenet", 1)
    x3 = (g.expand(-1, 3, -1, -1) - torch.tensor(m3).view(1, 3, 1, 1)) / torch.tensor(s3).view(1, 3, 1, 1)
    return x3, (g - m1[0]) / s1[0]


def test_rgb_teacher_folded_to_grey_is_exact_on_imagenet_normalised_input(tmp_path):
    """Xiao et al.'s RGB teacher, loaded by `fasttrain pretrain` for a 1-channel student: its
    block-8 features on the student's input equal the RGB teacher's on the same grey image
    replicated and ImageNet-normalised (summing the RGB filters alone is off by the per-channel
    scale and mean)."""
    torch.manual_seed(0)
    arch = dict(img_size=32, patch_size=8, embed_dim=24, depth=9, num_heads=2)
    t3 = create_model("mae_vit_small_patch16", in_chans=3, decoder_depth=1, **arch).eval()
    with torch.no_grad():
        t3.patch_embed.proj.weight.add_(torch.randn_like(t3.patch_embed.proj.weight) * 0.2)
        t3.patch_embed.proj.bias.normal_(0, 0.5)
    path = tmp_path / "vit-s_CXR_0.3M_mae.pth"
    torch.save({"model": t3.state_dict()}, path)
    cfg = build_config(None, ["--model.img_size=32", "--model.patch_size=8", "--model.in_chans=1", "--model.depth=9",
                              "--distill.teacher=mae_vit_small_patch16", f"--distill.teacher_ckpt={path}",
                              "--distill.teacher_embed_dim=24", "--distill.teacher_depth=9",
                              "--distill.teacher_num_heads=2", "--distill.student_blocks=[8]",
                              "--distill.teacher_blocks=[8]", "--data.norm=imagenet"])
    t1 = build_pretrain_model(cfg).teacher
    assert t1.in_chans == 1
    x3, x1 = grey_inputs()
    with torch.no_grad():
        torch.testing.assert_close(block_features(t1, x1, 8), block_features(t3, x3, 8), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("c_from,c_to", [(3, 1), (1, 3)])
def test_classifier_init_across_channels_is_exact_on_normalised_input(tmp_path, c_from, c_to, tiny_model):
    """`finetune --init` / `probe` of an encoder with other input channels: the classifier's
    features on its own normalised input equal the source's on the same grey image."""
    torch.manual_seed(1)
    src = tiny_model(in_chans=c_from).eval()
    with torch.no_grad():
        src.patch_embed.proj.bias.normal_(0, 0.5)
    path = tmp_path / "student.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = tiny_model("vit_tiny_patch16", in_chans=c_to, num_classes=3).eval()
    init_classifier(dst, str(path), "imagenet")
    x3, x1 = grey_inputs()
    x_src, x_dst = (x3, x1) if c_from == 3 else (x1, x3)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_tokens(x_dst), src.forward_tokens(x_src), atol=1e-4, rtol=1e-4)


def test_classifier_init_folds_with_the_source_runs_own_norm(tmp_path, tiny_model):
    """A fasttrain pre-training checkpoint of 3 channels fed ImageNet stats, fine-tuned as a
    1-channel classifier under data.norm=nih: the fold uses the source run's norm for its
    channels and ours for the classifier's, so the features on the same grey image agree."""
    torch.manual_seed(2)
    src = tiny_model(in_chans=3).eval()
    with torch.no_grad():
        src.patch_embed.proj.bias.normal_(0, 0.5)
    path = tmp_path / "last.pt"
    save_atomic({"kind": "pretrain", "model": src.state_dict(),
                 "config": {"model": {"in_chans": 3}, "data": {"norm": "imagenet"}}}, path)
    dst = tiny_model("vit_tiny_patch16", in_chans=1, num_classes=3).eval()
    init_classifier(dst, str(path), "nih")
    x3, _ = grey_inputs()
    (m1,), (s1,) = norm_stats("nih", 1)
    g = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))  # grey_inputs' image
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_tokens((g - m1) / s1), src.forward_tokens(x3), atol=1e-4, rtol=1e-4)


def test_in_chans_conversion_needs_both_channel_counts_normalisation():
    w, b = torch.randn(4, 3, 2, 2), torch.zeros(4)
    with pytest.raises(CheckpointError, match="normalisation of 1 channels"):
        convert_in_chans(w, b, 1, "patch_embed.proj.weight", {3: ((0.5,) * 3, (0.2,) * 3)})
