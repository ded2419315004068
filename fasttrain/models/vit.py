"""ViT encoder with timm's `VisionTransformer` state-dict layout, built from timm's blocks.

Keys: patch_embed.proj.{weight,bias}, cls_token [1,1,D], pos_embed [1,1+L,D],
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*, norm.* -- the layout of timm's
`vit_*_patch16_224`, of the official MAE checkpoints and of Xiao et al.'s X-ray MAE checkpoints,
so all of them load strictly.

Position embeddings are MAE's fixed 2-D sin-cos table (a Parameter with requires_grad=False,
so it sits in the state dict under the same key as timm's learned one). The fine-tuning model
makes it learnable again, as MAE's fine-tuning does.
"""
from __future__ import annotations

import contextlib
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

# MAE and timm's ViTs both use LayerNorm with eps 1e-6; features only match timm's with the same eps.
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


# ----------------------------------------------------------------------------- sin-cos tables

def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos [M] -> [M, embed_dim]: half sin, half cos, frequencies 1/10000^(2i/d) (MAE's table)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [D/2]
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding as in MAE -> [1, (1 +) gh*gw, D] float32.

    The first half of the channels encodes the column (w) coordinate, the second half the row
    (h) coordinate, and the cls slot is zeros: exactly MAE's `get_2d_sincos_pos_embed`, so the
    values equal those stored in MAE-layout checkpoints.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # [gh, gw]
    emb_w = _sincos_1d(embed_dim // 2, grid_w)  # [gh*gw, D/2]
    emb_h = _sincos_1d(embed_dim // 2, grid_h)  # [gh*gw, D/2]
    emb = np.concatenate([emb_w, emb_h], axis=1)  # [gh*gw, D]
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)  # [1+L, D]
    return torch.from_numpy(emb).float().unsqueeze(0)  # [1, (1+)L, D]


# ----------------------------------------------------------------------------- attention

REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def upcast_attention_here(qkv: torch.Tensor) -> bool:
    """Whether to run scaled-dot-product attention in fp32 instead of qkv's bf16/fp16.

    Only on CPU and only when the attention will be back-propagated: PyTorch's CPU
    flash-attention kernel runs its *backward* markedly slower in bf16 than in fp32 (measured
    on this project's AVX512-BF16 CPU: ViT-T/MAE decoder shapes, fp32 fwd+bwd ~1.6-2x faster),
    while its forward costs the same in either dtype, so the frozen bf16 teacher (no grad) and
    every GPU (where bf16 flash attention is the fast path) keep the reduced dtype.
    fp32 attention is also the more exact one, so the result stays within autocast tolerance
    of the fp32 reference.
    """
    return (qkv.device.type == "cpu" and qkv.dtype in REDUCED_DTYPES
            and torch.is_grad_enabled() and qkv.requires_grad)


class Attention(TimmAttention):
    """timm's multi-head self-attention (same parameters, same state-dict keys, same math)
    with one precision choice for CPU training under autocast: see `upcast_attention_here`.

    `upcast_cpu = False` (class or instance attribute) gives timm's behaviour exactly; the
    tests compare both.
    """

    upcast_cpu: bool = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, query_index: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; with query_index [B, M] (token indices) -> [B, M, D], the
        output at those tokens only: keys and values still come from all N tokens."""
        if not (self.upcast_cpu and self.fused_attn and self.gate is None):
            out = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # [B, N, D]
            return out if query_index is None else gather_tokens(out, query_index)
        B, N, _ = x.shape
        qkv = self.qkv(x)  # [B, N, 3*A] (bf16 under autocast)
        dtype = qkv.dtype
        upcast = upcast_attention_here(qkv)
        if upcast:
            qkv = qkv.float()  # one cast of the fused qkv, not three
        if query_index is None:
            qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
            q, k, v = qkv.unbind(0)  # [B, H, N, Dh] each
        else:
            A, M = self.attn_dim, query_index.shape[1]
            # q of every token comes out of the one fused qkv matmul (cheaper than a second
            # matmul for the subset); keep only the queried rows
            q = gather_tokens(qkv[..., :A], query_index)  # [B, M, A]
            q = q.reshape(B, M, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, M, Dh]
            kv = qkv[..., A:].reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, B, H, N, Dh]
            k, v = kv.unbind(0)  # [B, H, N, Dh] each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        # autocast would cast SDPA's fp32 inputs back to bf16: keep it off for this one op
        with torch.autocast(x.device.type, enabled=False) if upcast else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal)  # [B, H, N, Dh]
        o = o.to(dtype).transpose(1, 2).reshape(B, q.shape[2], self.attn_dim)  # [B, N or M, A] in qkv's dtype
        o = self.norm(o)
        return self.proj_drop(self.proj(o))  # [B, N, D]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] int64 -> x at those tokens [B, M, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, M, D]


def block_at(blk: Block, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blk(x) evaluated at tokens `index` only: x [B, N, D], index [B, M] -> [B, M, D].

    Equal to gather_tokens(blk(x), index): attention still reads keys/values of all N tokens,
    but queries, the output projection, the residual and the MLP run on the M tokens only.
    Used for the MAE decoder's last block, whose outputs at visible patches are never scored.
    """
    if not isinstance(blk.attn, Attention):
        return gather_tokens(blk(x), index)  # plain timm attention: full block, then select
    x_q = gather_tokens(x, index)  # [B, M, D] residual stream at the queried tokens
    x_q = x_q + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), query_index=index)))  # [B, M, D]
    return x_q + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_q))))  # [B, M, D]


def make_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> Block:
    """timm's pre-norm ViT Block (qkv bias, LayerNorm eps 1e-6) with our `Attention`."""
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=LayerNorm6,
                 attn_layer=Attention)


# ----------------------------------------------------------------------------- encoder

def init_vit_weights_(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Patch embedding + cls token + position embedding + timm Blocks + final norm.

    Subclassed by the MAE (adds masking and a decoder) and the classifier (adds pooling and a
    head); the encoder keys stay at the top level so the state dict is timm's layout.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, learn_pos_embed: bool = False):
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos (MAE) unless learnable (fine-tuning); a Parameter either way so the key and
        # .to()/.half() behaviour match timm's and MAE's models.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size), requires_grad=learn_pos_embed)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth (timm)
        self.blocks = nn.ModuleList([
            make_block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i]) for i in range(depth)])
        self.norm = LayerNorm6(embed_dim)

    def _init_encoder_weights(self) -> None:
        # patch-embed conv initialised like a Linear over the flattened patch (MAE)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    # -- stages ------------------------------------------------------------------------------

    def embed_cls(self, n: int) -> torch.Tensor:
        """cls token plus its position slot -> [n, 1, D]."""
        return (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)  # [n, 1, D]

    def run_blocks(self, x: torch.Tensor, return_blocks=(), stop_after: int | None = None
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """x [N, T, D] through blocks[0..stop_after] -> (x [N, T, D], {k: output of blocks[k]}).

        stop_after=None runs all blocks; the distillation teacher stops at its aligned block
        because nothing after it is used (a third less teacher compute at 3/4 depth).
        """
        wanted = set(int(k) for k in return_blocks)
        for k in wanted:
            if not 0 <= k < self.depth:
                raise ValueError(f"block index {k} out of range for a {self.depth}-block encoder (0..{self.depth - 1})")
        last = self.depth - 1 if stop_after is None else int(stop_after)
        if not 0 <= last < self.depth:
            raise ValueError(f"stop_after={stop_after} out of range for a {self.depth}-block encoder")
        feats: dict[int, torch.Tensor] = {}
        for k in range(last + 1):
            x = self.blocks[k](x)  # [N, T, D]
            if k in wanted:
                feats[k] = x
        missing = wanted - set(feats)
        if missing:
            raise ValueError(f"blocks {sorted(missing)} requested but the encoder stops after block {last}")
        return x, feats

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Full, unmasked encoder without the final norm: imgs [N, C, H, W] -> [N, 1+L, D]."""
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, 1:]  # [N, L, D]
        x = torch.cat([self.embed_cls(x.shape[0]), x], dim=1)  # [N, 1+L, D]
        x, _ = self.run_blocks(x)  # [N, 1+L, D]
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Full, unmasked encoder: imgs [N, C, H, W] -> [N, 1+L, D] after the final norm.

        Same computation as timm's `VisionTransformer.forward_features` (export checks rely on it).
        """
        return self.norm(self.forward_tokens(imgs))  # [N, 1+L, D]

    def encoder_config(self) -> dict:
        """The constructor arguments that determine the encoder's shapes (export, teacher checks)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio)


ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")


def is_encoder_key(key: str) -> bool:
    """True for keys of the timm ViT encoder layout (what export and classifiers keep)."""
    return key in ("cls_token", "pos_embed") or key.startswith(("patch_embed.", "blocks.", "norm."))
