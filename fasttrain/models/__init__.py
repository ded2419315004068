"""Models: ViT encoder, MAE, distillation wrapper, classifier, checkpoint I/O.

One small registry with explicit names (timm's `register_model` habit, without the decorators):
`create_model(name, **overrides)` builds one; unknown names and unknown overrides are errors
that list what is known.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from fasttrain.models.classifier import ViTClassifier, param_groups_layer_decay
from fasttrain.models.distill import ETMAE, DistillOutput, build_etmae, student_of
from fasttrain.models.mae import EncoderOutput, MaskedAutoencoderViT, Masking

# Encoder shapes (timm's vit_{tiny,small,base}_patch16_224 / DeiT).
_ENCODERS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),  # 6 heads: Xiao et al.'s ViT-S (not 12)
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
# MAE decoders: 512-d x 2 for the baseline's student and Xiao's ViT-S, MAE's 512-d x 8 for ViT-B.
_DECODERS = {
    "tiny": dict(decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16),
    "small": dict(decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16),
    "base": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}

_MAE_OVERRIDES = {"img_size", "in_chans", "patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio"}
_CLS_OVERRIDES = {"img_size", "in_chans", "patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio",
                  "num_classes", "drop_path_rate"}


def _entry(cls: type, defaults: dict, allowed: set) -> tuple[Callable[..., nn.Module], dict, set]:
    return cls, defaults, allowed


_REGISTRY: dict[str, tuple] = {}
for _size in ("tiny", "small", "base"):
    _REGISTRY[f"mae_vit_{_size}_patch16"] = _entry(
        MaskedAutoencoderViT, dict(img_size=224, patch_size=16, in_chans=3, **_ENCODERS[_size], **_DECODERS[_size]),
        _MAE_OVERRIDES)
    _REGISTRY[f"vit_{_size}_patch16"] = _entry(
        ViTClassifier, dict(img_size=224, patch_size=16, in_chans=3, num_classes=14, **_ENCODERS[_size]),
        _CLS_OVERRIDES)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_defaults(name: str) -> dict:
    """The constructor arguments a registry name stands for (before overrides)."""
    _check_name(name)
    return dict(_REGISTRY[name][1])


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace the registry's constructor arguments."""
    _check_name(name)
    cls, defaults, allowed = _REGISTRY[name]
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model '{name}'; allowed: {', '.join(sorted(allowed))}")
    kwargs = dict(defaults)
    kwargs.update(overrides)
    model = cls(**kwargs)
    model.registry_name = name
    return model


__all__ = ["create_model", "list_models", "model_defaults", "MaskedAutoencoderViT", "Masking", "EncoderOutput",
           "ETMAE", "DistillOutput", "build_etmae", "ViTClassifier", "param_groups_layer_decay"]
