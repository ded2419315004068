"""Masked-token gather (MAE encoder input) and un-shuffle with mask tokens (MAE decoder input)."""
from __future__ import annotations

import torch


def masked_gather_reference(x: torch.Tensor, ids_keep: torch.Tensor,
                            pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, L, D], ids_keep [N, K] (int64, distinct per row), pos_embed [1, L, D] or None -> [N, K, D].

    out[n, k] = x[n, ids_keep[n, k]] + pos_embed[0, ids_keep[n, k]]
    """
    if pos_embed is not None:
        x = x + pos_embed  # [N, L, D]
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [N, K, D]
    return torch.gather(x, 1, idx)  # [N, K, D]


def unshuffle_with_mask_token_reference(x_vis: torch.Tensor, mask_token: torch.Tensor,
                                        ids_restore: torch.Tensor) -> torch.Tensor:
    """x_vis [N, K, D], mask_token [D], ids_restore [N, L] -> [N, L, D].

    Appends L-K mask tokens after the K visible tokens (shuffled order), then un-shuffles:
    out[n, l] = x_vis[n, ids_restore[n, l]] if ids_restore[n, l] < K else mask_token.
    """
    N, K, D = x_vis.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x_vis.dtype).expand(N, L - K, D)  # [N, L-K, D]
    x_ = torch.cat([x_vis, mask_tokens], dim=1)  # [N, L, D] in shuffled order
    idx = ids_restore.unsqueeze(-1).expand(-1, -1, D)  # [N, L, D]
    return torch.gather(x_, 1, idx)  # [N, L, D] in patch order


def masked_gather(x: torch.Tensor, ids_keep: torch.Tensor,
                  pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatching entry point; see masked_gather_reference for the semantics."""
    return masked_gather_reference(x, ids_keep, pos_embed)


def unshuffle_with_mask_token(x_vis: torch.Tensor, mask_token: torch.Tensor,
                              ids_restore: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point; see unshuffle_with_mask_token_reference for the semantics."""
    return unshuffle_with_mask_token_reference(x_vis, mask_token, ids_restore)
