"""Config errors name the key; YAML and dotted overrides layer over the defaults; every shipped
config loads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fasttrain.config import Config, ConfigError, build_config, config_from_dict, parse_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_yaml_then_dotted_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  blr: 2.0e-4\n  epochs: 3\nmodel:\n  img_size: 64\n")
    cfg = build_config(y, ["--optim.blr=1e-3", "run.seed=7", "--distill.student_blocks=[2, 3]"])
    assert cfg.optim.blr == 1e-3  # override beats YAML
    assert cfg.optim.epochs == 3  # YAML beats default
    assert cfg.model.img_size == 64
    assert cfg.run.seed == 7 and cfg.distill.student_blocks == [2, 3]
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default


def test_unknown_key_is_an_error_naming_it(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'optim.lrr'"):
        build_config(y)
    with pytest.raises(ConfigError, match="unknown config key 'nosection'"):
        build_config(None, ["--nosection.x=1"])
    with pytest.raises(ConfigError, match="unknown config key 'engine.turbo'"):
        build_config(None, ["--engine.turbo=true"])


def test_wrong_type_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="'optim.epochs': expected an int"):
        build_config(None, ["--optim.epochs=1.5"])
    with pytest.raises(ConfigError, match="'run.deterministic': expected true/false"):
        build_config(None, ["--run.deterministic=3"])
    with pytest.raises(ConfigError, match=r"'optim.betas\[1\]': expected a float"):
        config_from_dict({"optim": {"betas": [0.9, "x"]}})
    y = tmp_path / "t.yaml"
    y.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="'model': expected a mapping"):
        build_config(y)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="section.key"):
        parse_overrides(["--lr=1"])


def test_int_accepted_for_float_and_null_for_optional():
    cfg = build_config(None, ["--optim.blr=1", "--distill.teacher=null", "--optim.clip_grad=1"])
    assert isinstance(cfg.optim.blr, float) and cfg.distill.teacher is None and cfg.optim.clip_grad == 1.0


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(None, ["--optim.blr=3e-4", "--model.depth=4"])
    cfg.save(tmp_path / "config.yaml")
    again = build_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "demo").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = build_config(path)
    assert cfg.optim.epochs >= 1


def test_paper_recipes():
    t = build_config(CONFIGS / "pretrain_vitb_to_vitt.yaml")
    assert (t.distill.teacher, t.model.name, t.optim.epochs, t.data.batch_size) == \
        ("mae_vit_base_patch16", "mae_vit_tiny_patch16", 100, 32)
    assert t.optim.blr == 1.5e-4 and t.optim.betas == [0.9, 0.95] and t.model.mask_ratio == 0.75
    assert t.distill.student_blocks == [8] and t.distill.teacher_blocks == [8] and t.distill.alpha == 1.0
    s = build_config(CONFIGS / "pretrain_vits_to_vitt.yaml")
    assert s.distill.teacher == "mae_vit_small_patch16"
    nih = build_config(CONFIGS / "finetune_nih.yaml")
    chx = build_config(CONFIGS / "finetune_chexpert.yaml")
    assert nih.model.num_classes == 14 and chx.model.num_classes == 5
    for f in (nih, chx):
        assert (f.optim.blr, f.optim.layer_decay, f.optim.weight_decay, f.model.drop_path, f.optim.warmup_epochs,
                f.optim.betas, f.optim.epochs) == (2.5e-4, 0.55, 0.05, 0.2, 5.0, [0.9, 0.999], 100)


ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_training_crop_is_bicubic_unless_a_config_says_why(path):
    """MAE's and Xiao et al.'s pre-training crop is RandomResizedCrop(..., interpolation=3) and
    Xiao's fine-tuning create_transform(interpolation='bicubic'): every shipped config resolves
    to bicubic, or its line choosing bilinear carries a comment saying why."""
    cfg = build_config(path)
    if cfg.data.interpolation == "bicubic":
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("interpolation:")]
    assert lines and all("#" in ln for ln in lines), f"{path}: bilinear crop without a reason"


def test_default_training_crop_is_bicubic():
    assert Config().data.interpolation == "bicubic"
    for name in ("pretrain_vits_to_vitt.yaml", "pretrain_vitb_to_vitt.yaml"):
        assert build_config(CONFIGS / "paper" / name).data.interpolation == "bicubic"
        assert build_config(CONFIGS / name).data.interpolation == "bicubic"


# Xiao et al.'s ViT fine-tuning command (medical_mae FINETUNE.md): config key -> its value there
XIAO_FINETUNE_MD = {"epochs": 75, "batch_size": 128, "min_lr": 1e-5, "eval_every": 10, "blr": 2.5e-4,
                    "layer_decay": 0.55, "weight_decay": 0.05, "warmup_epochs": 5, "drop_path": 0.2}
SETTING = re.compile(r"^\s*(\w+):\s*([^#\s][^#]*?)\s*#(.*)$")


QUOTED = re.compile(r"FINETUNE\.md(?::| passes)\s*(?:--\w+\s+)?([0-9.e+-]+)")


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_settings_credited_to_xiao_have_finetune_md_values(path):
    """A setting whose comment credits Xiao et al. has the value of Xiao's FINETUNE.md command, and
    every value a comment quotes from FINETUNE.md is the one there."""
    for line in path.read_text().splitlines():
        m = SETTING.match(line)
        if not m or m.group(1) not in XIAO_FINETUNE_MD:
            continue
        key, value, comment = m.group(1), float(m.group(2)), m.group(3).strip()
        if comment.startswith("Xiao"):
            assert value == XIAO_FINETUNE_MD[key], f"{path}: {line}"
        for quoted in QUOTED.findall(comment):
            assert float(quoted) == XIAO_FINETUNE_MD[key], f"{path}: {line}"


def test_paper_finetune_keeps_the_papers_values():
    for name in ("finetune_nih.yaml", "finetune_chexpert.yaml"):
        cfg = build_config(CONFIGS / "paper" / name)
        assert (cfg.optim.epochs, cfg.data.batch_size) == (100, 32)  # the paper's, not Xiao's 75 x 128


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("pretrain_*.yaml")), ids=lambda p: p.name)
def test_decoder_named_in_comments_is_the_models(path):
    from fasttrain.models import create_model
    cfg = build_config(path)
    model = create_model(cfg.model.name)
    named = re.findall(r"decoder (\d+)-d x (\d+)", path.read_text())
    if path.name == "pretrain_vits_to_vitt.yaml":
        assert named
    for dim, depth in named:
        assert (int(dim), int(depth)) == (model.decoder_embed_dim, model.decoder_depth), path
