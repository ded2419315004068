"""Fine-tuning model: the ViT encoder, mean-pool of the patch tokens, fc_norm, Linear head.

As MAE's (and Xiao et al.'s) fine-tuning: global average pooling over the patch tokens replaces
the cls token and the encoder's final `norm` (so an MAE checkpoint's `norm.*` is not used), the
position embedding becomes learnable, and the head starts at trunc-normal std 2e-5.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from fasttrain.models.checkpoints import load_encoder
from fasttrain.models.vit import LayerNorm6, ViTEncoder, init_vit_weights_

log = logging.getLogger(__name__)

HEAD_INIT_STD = 2e-5  # MAE fine-tuning: a near-zero head so early gradients do not wreck the encoder
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")  # MAE's no_weight_decay list (+ every 1-D parameter)


class ViTClassifier(ViTEncoder):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, num_classes: int = 14,
                 drop_path_rate: float = 0.1):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         drop_path_rate=drop_path_rate, learn_pos_embed=True)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.drop_path_rate = drop_path_rate
        del self.norm  # pooled features use fc_norm instead (MAE's global_pool fine-tuning)
        self.fc_norm = LayerNorm6(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_vit_weights_)
        self._init_encoder_weights()
        self.reset_head()

    def reset_head(self) -> None:
        trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> pooled, normalised features [N, D]."""
        x = self.forward_tokens(imgs)  # [N, 1+L, D]
        x = x[:, 1:].mean(dim=1)  # [N, D] mean over patch tokens (cls unused)
        return self.fc_norm(x)  # [N, D]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # [N, num_classes] logits

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> logits [N, num_classes] (multi-label: train with BCE-with-logits)."""
        return self.forward_head(self.forward_features(imgs))

    def load_pretrained(self, source, what: str | None = None, input_norm=None):
        """Load the encoder from an MAE / ETMAE / timm checkpoint (path or state dict).

        Decoder keys and the MAE's final `norm` are not used (said in the log); fc_norm and head
        keep their fresh init when the checkpoint has none. Everything else must match (pos-embed
        grid and in_chans are converted, exactly under `input_norm`: see load_into). Returns the
        LoadReport.
        """
        return load_encoder(self, source, what=what, input_norm=input_norm)


def param_groups_layer_decay(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                             no_weight_decay: tuple[str, ...] = NO_WEIGHT_DECAY) -> list[dict]:
    """Parameter groups for layer-wise lr decay (BEiT/MAE fine-tuning).

    layer id: patch_embed, cls_token, pos_embed -> 0; blocks.i -> i + 1; everything else
    (fc_norm, head) -> depth + 1. lr_scale = layer_decay ** (depth + 1 - layer_id), so the head
    trains at the full lr and the patch embedding at layer_decay ** (depth + 1).
    Weight decay is 0 for every 1-D parameter (norms, biases) and for pos_embed and cls_token.
    Returns torch param-group dicts {"params", "weight_decay", "lr_scale", "layer_id"}; the
    schedule multiplies each group's lr by its lr_scale. Frozen parameters are skipped.
    """
    depth = len(model.blocks)
    num_layers = depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id_for(name, depth)
        decay = not (p.ndim == 1 or name in no_weight_decay)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers - lid), "layer_id": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def layer_id_for(name: str, depth: int) -> int:
    """Layer id of a parameter name for layer decay (see param_groups_layer_decay)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1
