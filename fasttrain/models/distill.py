"""ETMAE: MAE pre-training of a small student distilled from a frozen MAE teacher.

    L = L_MAE(student) + alpha * mean_pairs L_dist(proj(s_k), t_k')

s_k: the student's block-k output on its visible tokens (cls included); t_k': the teacher's
block-k' output on the SAME visible tokens (same ids_keep, the teacher's own position
embedding at those positions). The teacher is frozen, always in eval mode, runs under
no_grad, and only up to its deepest aligned block: nothing after it is ever used.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from fasttrain.losses import feature_align_l1
from fasttrain.models.mae import Masking, MaskedAutoencoderViT, check_decoder_mode

log = logging.getLogger(__name__)

TEACHER_MODES = ("truncated", "full")


class DistillOutput(NamedTuple):
    loss: torch.Tensor  # scalar: loss_mae + alpha * loss_dist
    loss_mae: torch.Tensor  # scalar: masked MSE of the student
    loss_dist: torch.Tensor  # scalar: feature alignment, averaged over the block pairs
    pred: torch.Tensor  # [N, L, p*p*C] student reconstruction
    mask: torch.Tensor  # [N, L] 1 = removed


def make_projection(d_student: int, d_teacher: int, kind: str) -> nn.Module:
    """Projection head student width -> teacher width: one Linear (paper) or a 2-layer MLP."""
    if kind == "linear":
        head = nn.Linear(d_student, d_teacher)
    elif kind == "mlp":
        head = nn.Sequential(nn.Linear(d_student, d_teacher), nn.GELU(), nn.Linear(d_teacher, d_teacher))
    else:
        raise ValueError(f"unknown projection '{kind}'; choose 'linear' or 'mlp'")
    for m in head.modules():
        if isinstance(m, nn.Linear):  # same init as the rest of the MAE
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


class ETMAE(nn.Module):
    """Student MAE + frozen teacher MAE + projection heads.

    The state dict holds `student.*` and `proj.*` only: the teacher is a frozen input, reloaded
    from its own checkpoint (saving a ViT-B with every training checkpoint would cost ~0.4 GB a
    write). Set `save_teacher=True` to keep `teacher.*` in the state dict. Loading a state dict
    without teacher keys into an ETMAE is not an error for the same reason.
    """

    def __init__(self, student: MaskedAutoencoderViT, teacher: MaskedAutoencoderViT,
                 student_blocks: Sequence[int] = (8,), teacher_blocks: Sequence[int] = (8,),
                 alpha: float = 1.0, proj: str = "linear", save_teacher: bool = False):
        super().__init__()
        student_blocks = [int(k) for k in student_blocks]
        teacher_blocks = [int(k) for k in teacher_blocks]
        if len(student_blocks) != len(teacher_blocks) or not student_blocks:
            raise ValueError(f"student_blocks {student_blocks} and teacher_blocks {teacher_blocks} must be "
                             "non-empty lists of the same length (one pair per aligned block)")
        for k in student_blocks:
            if not 0 <= k < student.depth:
                raise ValueError(f"student block {k} out of range: the student has {student.depth} blocks (0..{student.depth - 1})")
        for k in teacher_blocks:
            if not 0 <= k < teacher.depth:
                raise ValueError(f"teacher block {k} out of range: the teacher has {teacher.depth} blocks (0..{teacher.depth - 1})")
        check_teacher_compatible(student, teacher)
        self.student = student
        self.teacher = teacher
        self.student_blocks = student_blocks
        self.teacher_blocks = teacher_blocks
        self.alpha = float(alpha)
        self.proj_kind = proj
        self.save_teacher = save_teacher
        self.proj = nn.ModuleList([make_projection(student.embed_dim, teacher.embed_dim, proj)
                                   for _ in student_blocks])
        teacher.requires_grad_(False)
        teacher.eval()
        self.register_state_dict_post_hook(_drop_teacher_keys)
        self.register_load_state_dict_post_hook(_forgive_missing_teacher)

    # The teacher stays in eval mode whatever the caller does (dropout/drop-path off, as frozen).
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and projection parameters that need gradients (never the teacher's)."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    # -- teacher -----------------------------------------------------------------------------

    def _teacher_input(self, imgs: torch.Tensor) -> torch.Tensor:
        """Adapt the student's input to the teacher: gray -> 3 channels, teacher's dtype."""
        if imgs.shape[1] != self.teacher.in_chans:
            imgs = imgs.expand(-1, self.teacher.in_chans, -1, -1)  # [N, 3, H, W] (checked compatible)
        w = self.teacher.patch_embed.proj.weight
        if imgs.dtype != w.dtype and not torch.is_autocast_enabled(imgs.device.type):
            imgs = imgs.to(w.dtype)  # a bf16 copy of the teacher takes bf16 input
        return imgs

    @torch.no_grad()
    def teacher_features(self, imgs: torch.Tensor, ids_keep: torch.Tensor,
                         blocks: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Teacher block outputs on the visible tokens, truncated: {k: [N, 1+K, D_t]}.

        Runs the teacher's blocks only up to max(blocks); no final norm, no decoder.
        """
        blocks = self.teacher_blocks if blocks is None else list(blocks)
        _, feats = self.teacher.encode_visible(self._teacher_input(imgs), ids_keep, blocks, stop_after=max(blocks))
        return feats

    @torch.no_grad()
    def teacher_features_full(self, imgs: torch.Tensor, masking: Masking,
                              blocks: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """The baseline's teacher: full encoder and decoder on the visible tokens, features read at
        the aligned blocks. Same features as teacher_features, more compute (reference mode)."""
        blocks = self.teacher_blocks if blocks is None else list(blocks)
        enc = self.teacher.forward_encoder(self._teacher_input(imgs), masking=masking, return_blocks=blocks)
        self.teacher.forward_decoder(enc.latent, enc.ids_restore)  # computed and discarded, as the baseline does
        return enc.feats

    # -- forward -----------------------------------------------------------------------------

    def distill_loss(self, student_feats: dict, teacher_feats: dict) -> torch.Tensor:
        """Mean over the block pairs of feature_align_l1(proj_i(s_k), t_k') -> scalar."""
        terms = []
        for head, ks, kt in zip(self.proj, self.student_blocks, self.teacher_blocks):
            s = head(student_feats[ks])  # [N, 1+K, D_t]
            terms.append(feature_align_l1(s, teacher_feats[kt]))
        return torch.stack(terms).mean()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                noise: Optional[torch.Tensor] = None, teacher_mode: str = "truncated",
                decoder: str = "full") -> DistillOutput:
        """imgs [N, C, H, W] -> DistillOutput(loss, loss_mae, loss_dist, pred [N, L, p*p*C], mask [N, L]).

        decoder="masked" (training fast path, same losses): the student's decoder finishes only
        the removed patches, pred is [N, L-K, p*p*C] (see MaskedAutoencoderViT.forward).
        """
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher_mode '{teacher_mode}'; choose one of {', '.join(TEACHER_MODES)}")
        check_decoder_mode(decoder)
        st = self.student
        ratio = st.mask_ratio if mask_ratio is None else mask_ratio
        masking = st.random_masking(imgs.shape[0], st.num_patches, ratio, imgs.device, noise)
        enc = st.forward_encoder(imgs, masking=masking, return_blocks=self.student_blocks)
        pred, loss_mae = st.decode_and_score(imgs, enc, decoder)  # pred [N, L or L-K, p*p*C]
        if teacher_mode == "truncated":
            t_feats = self.teacher_features(imgs, masking.ids_keep)
        else:
            t_feats = self.teacher_features_full(imgs, masking)
        loss_dist = self.distill_loss(enc.feats, t_feats)
        loss = loss_mae + self.alpha * loss_dist
        return DistillOutput(loss, loss_mae, loss_dist, pred, enc.mask)


def check_teacher_compatible(student: MaskedAutoencoderViT, teacher: MaskedAutoencoderViT) -> None:
    """The teacher must see the student's visible tokens: same patch size and grid; channels
    compatible (a 3-channel teacher takes the gray image repeated; a 1-channel teacher cannot
    take an RGB student's input)."""
    problems = []
    if teacher.patch_size != student.patch_size:
        problems.append(f"patch size {teacher.patch_size} vs the student's {student.patch_size}")
    if teacher.num_patches != student.num_patches or teacher.img_size != student.img_size:
        problems.append(f"img_size {teacher.img_size} ({teacher.num_patches} patches) vs the student's "
                        f"{student.img_size} ({student.num_patches} patches)")
    if teacher.in_chans != student.in_chans and not (student.in_chans == 1 and teacher.in_chans == 3):
        problems.append(f"in_chans {teacher.in_chans} vs the student's {student.in_chans} "
                        "(build or load the teacher with the student's in_chans)")
    if problems:
        raise ValueError("teacher incompatible with the student: " + "; ".join(problems))


def _drop_teacher_keys(module: ETMAE, state_dict, prefix, local_metadata):
    if not module.save_teacher:
        for k in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
            del state_dict[k]


def _forgive_missing_teacher(module: ETMAE, incompatible_keys) -> None:
    # missing_keys holds full names relative to the root module being loaded; our teacher's keys
    # contain ".teacher." or start with "teacher." depending on nesting.
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith("teacher.") or ".teacher." in k)]


def student_of(model: nn.Module) -> nn.Module:
    """The model that learns and is saved as the run's encoder: an ETMAE's student, any other
    model itself. DDP / torch.compile wrappers are the caller's to unwrap (engine.unwrap)."""
    return model.student if isinstance(model, ETMAE) else model


def build_etmae(student_name: str = "mae_vit_tiny_patch16", teacher_name: str | None = "mae_vit_base_patch16",
                teacher_ckpt: str | None = None, student_blocks: Sequence[int] = (8,),
                teacher_blocks: Sequence[int] = (8,), alpha: float = 1.0, proj: str = "linear",
                teacher_overrides: dict | None = None, **student_overrides) -> ETMAE:
    """Student from the registry (+ overrides); teacher from the registry at the student's
    img_size/in_chans/patch_size, loaded strictly from `teacher_ckpt` when given (a wrong-size
    checkpoint fails here, before any training)."""
    # cycles: fasttrain.models imports this module, and models.checkpoints imports student_of from it
    from fasttrain.models import create_model
    from fasttrain.models.checkpoints import load_teacher

    student = create_model(student_name, **student_overrides)
    if teacher_name is None:
        raise ValueError("build_etmae needs a teacher_name (the teacher's registry name)")
    t_over = dict(img_size=student.img_size, in_chans=student.in_chans, patch_size=student.patch_size)
    t_over.update(teacher_overrides or {})
    if teacher_ckpt is not None:
        teacher = load_teacher(teacher_name, teacher_ckpt, **t_over)
    else:
        log.warning("teacher %s has random weights (no teacher checkpoint given)", teacher_name)
        teacher = create_model(teacher_name, **t_over)
    return ETMAE(student, teacher, student_blocks, teacher_blocks, alpha=alpha, proj=proj)
