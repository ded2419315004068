"""Masked autoencoder (He et al. 2022) with the MAE / Xiao et al. checkpoint layout.

State dict = the timm ViT encoder keys (see vit.py) + decoder_embed, mask_token,
decoder_pos_embed, decoder_blocks.N.*, decoder_norm, decoder_pred: the layout of the official
MAE checkpoints and of Xiao et al.'s `vit-s_CXR_0.3M_mae.pth` / `vit-b_CXR_0.5M_mae.pth`.

The token moves (gather of the visible tokens, un-shuffle with mask tokens) go through
`fasttrain.kernels`, which dispatches to a fused kernel or its torch reference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from fasttrain import kernels
from fasttrain.losses import masked_mse
from fasttrain.models.vit import (LayerNorm6, ViTEncoder, block_at, gather_tokens, init_vit_weights_, make_block,
                                  sincos_pos_embed_2d)


DECODER_MODES = ("full", "masked")


def check_decoder_mode(decoder: str) -> None:
    if decoder not in DECODER_MODES:
        raise ValueError(f"unknown decoder mode '{decoder}'; choose one of {', '.join(DECODER_MODES)}")


class Masking(NamedTuple):
    """One random mask: K = int(L * (1 - mask_ratio)) patches kept per image."""
    ids_keep: torch.Tensor  # [N, K] int64: patch indices fed to the encoder, in shuffled order
    ids_restore: torch.Tensor  # [N, L] int64: argsort(ids_shuffle), un-shuffles the decoder input
    mask: torch.Tensor  # [N, L] float: 1 = removed (predicted), 0 = kept


class EncoderOutput(NamedTuple):
    latent: torch.Tensor  # [N, 1+K, D] after the final norm (cls first)
    mask: torch.Tensor  # [N, L] 1 = removed
    ids_restore: torch.Tensor  # [N, L]
    ids_keep: torch.Tensor  # [N, K]
    feats: dict  # {block index k: [N, 1+K, D] raw output of blocks[k] (before the final norm)}


class MaskedAutoencoderViT(ViTEncoder):
    """MAE: ViT encoder on the visible patches + cls, light decoder over all patches."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 decoder_embed_dim: int = 512, decoder_depth: int = 2, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True, mask_ratio: float = 0.75):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=0.0,
                         learn_pos_embed=False)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_embed_dim % decoder_num_heads != 0:
            raise ValueError(f"decoder_embed_dim {decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {decoder_num_heads}")
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_embed_dim, self.grid_size),
                                              requires_grad=False)  # [1, 1+L, Dd] fixed
        self.decoder_blocks = nn.ModuleList([
            make_block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm6(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init (pos-embeds are already the sin-cos tables)."""
        self.apply(init_vit_weights_)
        self._init_encoder_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    # -- patches -----------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> [N, L, p*p*C], pixels ordered (row, col, channel) inside a patch (MAE)."""
        p, c = self.patch_size, self.in_chans
        n, ci, h, w = imgs.shape
        if ci != c or h % p or w % p:
            raise ValueError(f"patchify: expected [N, {c}, H, W] with H, W multiples of {p}, got {list(imgs.shape)}")
        gh, gw = h // p, w // p
        x = imgs.reshape(n, c, gh, p, gw, p)  # [N, C, gh, p, gw, p]
        x = torch.einsum("nchpwq->nhwpqc", x)  # [N, gh, gw, p, p, C]
        return x.reshape(n, gh * gw, p * p * c)  # [N, L, p*p*C]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> imgs [N, C, H, W] (inverse of patchify, square grid)."""
        p, c = self.patch_size, self.in_chans
        n, L, _ = x.shape
        g = int(round(L ** 0.5))
        if g * g != L or x.shape[-1] != p * p * c:
            raise ValueError(f"unpatchify: expected [N, g*g, {p * p * c}], got {list(x.shape)}")
        x = x.reshape(n, g, g, p, p, c)  # [N, gh, gw, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, gh, p, gw, p]
        return x.reshape(n, c, g * p, g * p)  # [N, C, H, W]

    # -- masking -----------------------------------------------------------------------------

    @staticmethod
    def num_kept(L: int, mask_ratio: float) -> int:
        return int(L * (1 - mask_ratio))

    def random_masking(self, N: int, L: int, mask_ratio: float, device=None,
                       noise: Optional[torch.Tensor] = None) -> Masking:
        """MAE's per-sample shuffle: keep the K patches with the smallest noise.

        noise [N, L] (uniform by default; pass it to reproduce a mask) -> Masking(ids_keep [N, K],
        ids_restore [N, L], mask [N, L]) with K = int(L * (1 - mask_ratio)); mask 1 = removed.
        """
        K = self.num_kept(L, mask_ratio)
        if K < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {L}")
        if noise is None:
            noise = torch.rand(N, L, device=device)  # [N, L]
        elif noise.shape != (N, L):
            raise ValueError(f"noise must be [N, L] = [{N}, {L}], got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L] ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L] inverse permutation
        ids_keep = ids_shuffle[:, :K]  # [N, K]
        # mask in patch order: 0 for the first K of the shuffled order, 1 after, then un-shuffle
        mask = (ids_restore >= K).to(torch.float32)  # [N, L]
        return Masking(ids_keep, ids_restore, mask)

    # -- encoder -----------------------------------------------------------------------------

    def embed_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W], ids_keep [N, K] -> cls + visible tokens with position embedding [N, 1+K, D]."""
        x = self.patch_embed(imgs)  # [N, L, D]
        x = kernels.masked_gather(x, ids_keep, self.pos_embed[:, 1:])  # [N, K, D] (+ pos at kept slots)
        return torch.cat([self.embed_cls(x.shape[0]), x], dim=1)  # [N, 1+K, D]

    def encode_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor, return_blocks=(),
                       stop_after: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Encoder blocks on given visible tokens, no final norm -> (x [N, 1+K, D], {k: [N, 1+K, D]}).

        stop_after=k stops after blocks[k] (the truncated distillation teacher).
        """
        x = self.embed_visible(imgs, ids_keep)  # [N, 1+K, D]
        return self.run_blocks(x, return_blocks, stop_after)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                        noise: Optional[torch.Tensor] = None, return_blocks=(),
                        masking: Optional[Masking] = None) -> EncoderOutput:
        """imgs [N, C, H, W] -> EncoderOutput(latent [N, 1+K, D], mask, ids_restore, ids_keep, feats).

        `masking` (a Masking from random_masking) overrides mask_ratio/noise, so a second model
        can run on exactly the same visible tokens.
        """
        N = imgs.shape[0]
        if masking is None:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            masking = self.random_masking(N, self.num_patches, ratio, imgs.device, noise)
        x, feats = self.encode_visible(imgs, masking.ids_keep, return_blocks)  # [N, 1+K, D]
        latent = self.norm(x)  # [N, 1+K, D]
        return EncoderOutput(latent, masking.mask, masking.ids_restore, masking.ids_keep, feats)

    # -- decoder -----------------------------------------------------------------------------

    def decoder_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> decoder input [N, 1+L, Dd] (cls first, patch order)."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        x_all = kernels.unshuffle_with_mask_token(
            x[:, 1:], self.mask_token.reshape(-1), ids_restore)  # [N, L, Dd] in patch order
        x = torch.cat([x[:, :1], x_all], dim=1)  # [N, 1+L, Dd]
        return x + self.decoder_pos_embed  # [N, 1+L, Dd]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> pred [N, L, p*p*C] (pixels of every patch)."""
        x = self.decoder_tokens(latent, ids_restore)  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)  # [N, 1+L, Dd]
        x = self.decoder_norm(x)  # [N, 1+L, Dd]
        x = self.decoder_pred(x)  # [N, 1+L, p*p*C]
        return x[:, 1:]  # [N, L, p*p*C] drop cls

    @staticmethod
    def masked_indices(ids_restore: torch.Tensor, num_kept: int) -> torch.Tensor:
        """ids_restore [N, L] -> ids_masked [N, L-K]: the removed patches (ids_shuffle[:, K:])."""
        return torch.argsort(ids_restore, dim=1)[:, num_kept:]  # [N, L-K]

    def forward_decoder_masked(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                               ids_masked: torch.Tensor) -> torch.Tensor:
        """Fast twin of forward_decoder for the loss: pred of the removed patches only.

        latent [N, 1+K, D], ids_restore [N, L], ids_masked [N, M] -> [N, M, p*p*C], equal to
        forward_decoder(...) gathered at ids_masked. Exact: the earlier blocks and the last
        block's keys/values still see every token; only the last block's queries, MLP, the
        norm and the pixel head skip the cls and visible tokens, which the loss never scores
        (about a tenth of the decoder's FLOPs at mask ratio 0.75).
        """
        x = self.decoder_tokens(latent, ids_restore)  # [N, 1+L, Dd]
        idx = ids_masked + 1  # [N, M] token index (cls is token 0)
        if len(self.decoder_blocks) == 0:
            x = gather_tokens(x, idx)  # [N, M, Dd]
        else:
            for blk in self.decoder_blocks[:-1]:
                x = blk(x)  # [N, 1+L, Dd]
            x = block_at(self.decoder_blocks[-1], x, idx)  # [N, M, Dd]
        x = self.decoder_norm(x)  # [N, M, Dd]
        return self.decoder_pred(x)  # [N, M, p*p*C]

    # -- loss --------------------------------------------------------------------------------

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] -> scalar MSE on the removed patches."""
        target = self.patchify(imgs)  # [N, L, p*p*C]
        return masked_mse(pred, target, mask, norm_pix=self.norm_pix_loss)

    def forward_loss_masked(self, imgs: torch.Tensor, pred_masked: torch.Tensor,
                            ids_masked: torch.Tensor) -> torch.Tensor:
        """Twin of forward_loss for forward_decoder_masked: imgs [N, C, H, W], pred_masked
        [N, M, p*p*C] at ids_masked [N, M] -> the same scalar (every scored patch is removed)."""
        target = gather_tokens(self.patchify(imgs), ids_masked)  # [N, M, p*p*C]
        ones = torch.ones(ids_masked.shape, device=pred_masked.device)  # [N, M]
        return masked_mse(pred_masked, target, ones, norm_pix=self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                noise: Optional[torch.Tensor] = None, decoder: str = "full"):
        """imgs [N, C, H, W] -> (loss scalar, pred, mask [N, L]).

        decoder="full": pred [N, L, p*p*C] of every patch (MAE). decoder="masked": the same
        loss from forward_decoder_masked, pred [N, L-K, p*p*C] of the removed patches in
        ids_shuffle order (training only needs the loss).
        """
        check_decoder_mode(decoder)
        enc = self.forward_encoder(imgs, mask_ratio, noise)
        pred, loss = self.decode_and_score(imgs, enc, decoder)
        return loss, pred, enc.mask

    def decode_and_score(self, imgs: torch.Tensor, enc: EncoderOutput, decoder: str = "full"):
        """Decoder + reconstruction loss of an encoder output -> (pred, loss); see forward."""
        if decoder == "masked":
            ids_masked = self.masked_indices(enc.ids_restore, enc.ids_keep.shape[1])  # [N, L-K]
            pred = self.forward_decoder_masked(enc.latent, enc.ids_restore, ids_masked)  # [N, L-K, p*p*C]
            return pred, self.forward_loss_masked(imgs, pred, ids_masked)
        pred = self.forward_decoder(enc.latent, enc.ids_restore)  # [N, L, p*p*C]
        return pred, self.forward_loss(imgs, pred, enc.mask)

    def trainable_parameters(self):
        """Parameters that need gradients (the fixed sin-cos tables are excluded)."""
        return [p for p in self.parameters() if p.requires_grad]
