"""kNN monitor during pre-training: how linearly useful the encoder's features are, every few epochs.

As the DINO / InstDisc monitor (Wu et al. 2018; DINO's `eval_knn.py`): features of a train subset
(the memory bank) and of the val split, L2-normalised; each val image's k most cosine-similar bank
images vote with weight exp(sim / T). Multi-label: a label's score is the weighted mean of the
neighbours' 0/1 labels over the neighbours where it is known (NaN labels do not vote). Per-label AUC
of those scores and their mean (kNN mAUC) go to metrics.jsonl (phase "val"), TensorBoard
(val/knn_mauc, val/knn_auc/<label>) and the progress line.
"""
from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from fasttrain.metrics import mean_of_defined, per_label_auc
from fasttrain.models.distill import student_of
from fasttrain.train.engine import autocast
from fasttrain.train.finetune import gather_predictions

log = logging.getLogger("fasttrain.train")


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """bank [M, D], bank_labels [M, C] (0/1, NaN = unknown), query [Q, D] -> scores [Q, C] in [0, 1].

    score[q, c] = sum_i w_qi y_ic / sum_i w_qi over the k nearest bank rows i (cosine) with y_ic
    known; w_qi = exp(cos(q, i) / T). NaN where none of the k neighbours knows label c."""
    if bank.shape[0] < 1:
        raise ValueError("kNN monitor: the memory bank is empty")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)  # [M, D]
    known = ~torch.isnan(bank_labels)  # [M, C]
    y = torch.nan_to_num(bank_labels.float())  # [M, C]
    out = []
    for q in F.normalize(query.float(), dim=1).split(chunk):  # [q, D] chunks bound the [q, M] similarity
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [q, k]
        # exp((sim - max) / T): the same ratios as DINO's exp(sim / T), without overflow at small T
        w = ((sim - sim[:, :1]) / temperature).exp()  # [q, k] (topk is sorted: column 0 is the max)
        wk = w[:, :, None] * known[idx]  # [q, k, C] weights of the neighbours that know each label
        num = (wk * y[idx]).sum(dim=1)  # [q, C]
        den = wk.sum(dim=1)  # [q, C]
        out.append(torch.where(den > 0, num / den.clamp(min=1e-30), torch.full_like(num, float("nan"))))
    return torch.cat(out)  # [Q, C]


@torch.no_grad()
def encoder_features(student, loader, device, amp_dtype=None, limit: int | None = None):
    """Mean-pooled patch tokens of the full, unmasked encoder (after its final norm) ->
    (features [N, D] float32 on CPU, labels [N, C]); stops after `limit` images."""
    feats, labels, n = [], [], 0
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            x = student.forward_features(images)  # [B, 1+L, D]
        feats.append(x[:, 1:].mean(dim=1).float().cpu())  # [B, D]
        labels.append(y.float().cpu())
        n += images.shape[0]
        if limit is not None and n >= limit:
            break
    f, lab = torch.cat(feats), torch.cat(labels)
    return (f[:limit], lab[:limit]) if limit is not None else (f, lab)


class KnnMonitor:
    """Called at the end of an epoch (from pre-training's validate hook): runs when the epoch is a
    multiple of eval.knn_every, or the last; returns the metrics to log ({} otherwise)."""

    def __init__(self, ev, bank_loader, val_loader, label_names, info, amp_dtype=None):
        self.ev, self.bank_loader, self.val_loader = ev, bank_loader, val_loader
        self.names = list(label_names)
        self.info, self.amp = info, amp_dtype
        self.trainer = None  # set once the Trainer exists: epoch, last step and the progress bar
        self.seconds = 0.0  # time spent in the monitor (the <= 5% budget, in summary.json)

    def due(self) -> bool:
        t = self.trainer
        if t is None or self.ev.knn_every <= 0:
            return False
        return (t.epoch + 1) % self.ev.knn_every == 0 or t.step.opt_step >= t.total_steps

    def __call__(self, model) -> dict:
        if not self.due():
            return {}
        t0 = time.perf_counter()
        student = student_of(model)
        student.eval()
        dev = self.info.device
        # each rank reads its shard of the train split: 1/world of the bank each, so that the
        # gathered bank is knn_train_images whatever the number of GPUs
        per_rank = -(-self.ev.knn_train_images // self.info.world_size)
        bank, bank_y = encoder_features(student, self.bank_loader, dev, self.amp, per_rank)
        query, query_y = encoder_features(student, self.val_loader, dev, self.amp)
        bank, bank_y = (torch.from_numpy(a) for a in gather_predictions(bank.numpy(), bank_y.numpy(), self.info))
        query, query_y = gather_predictions(query.numpy(), query_y.numpy(), self.info)
        scores = knn_scores(bank.to(dev), bank_y.to(dev), torch.from_numpy(query).to(dev),
                            k=self.ev.knn_k, temperature=self.ev.knn_temperature).cpu().numpy()  # [Q, C]
        # a label none of a query's neighbours knows gets the bank's prevalence (no information)
        prior = np.nan_to_num(np.nanmean(bank_y.numpy(), axis=0), nan=0.0)  # [C]
        scores = np.where(np.isnan(scores), prior[None, :], scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undefined labels: None below
            aucs = per_label_auc(query_y, scores, self.names)
        self.seconds += time.perf_counter() - t0
        mauc = mean_of_defined(aucs)
        if self.trainer is not None and hasattr(self.trainer, "bar_extra") and mauc is not None:
            self.trainer.bar_extra["knn_mAUC"] = f"{mauc:.3f}"
        out = {"knn_mauc": mauc, "knn_s": time.perf_counter() - t0, "knn_bank": int(bank.shape[0])}
        out.update({f"knn_auc/{n}": a for n, a in aucs.items()})
        return out
