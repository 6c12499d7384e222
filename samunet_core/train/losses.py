"""Losses on Bx1x256x256 logits against Bx256x256 {0,1} targets (SAM's recipe: 20 x focal + dice, IoU-head MSE).

Optional distillation keeps box behaviour: binary cross-entropy towards the frozen base model's probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """B: per-sample mean focal loss (Lin et al.), logits and target Bx...; target in {0, 1}."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """B: per-sample soft Dice loss 1 - (2|P.G| + s) / (|P| + |G| + s)."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    return 1 - (2 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B: IoU of the thresholded prediction (logits > 0) with the target (1 when both are empty); no gradient."""
    with torch.no_grad():
        pred = (logits > 0).flatten(1).float()
        target = target.flatten(1)
        inter = (pred * target).sum(1)
        union = pred.sum(1) + target.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass
class LossParts:
    total: torch.Tensor
    focal: float
    dice: float
    iou_mse: float
    kd: float
    iou: float


def segmentation_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                      teacher_logits: torch.Tensor | None = None, kd_weight: float = 0.0) -> LossParts:
    """logits Bx1xLxL, iou_pred Bx1, target BxLxL bool/float; teacher_logits like logits (or None)."""
    target = target.float().unsqueeze(1)
    focal = focal_loss(logits, target).mean()
    dice = dice_loss(logits, target).mean()
    actual_iou = mask_iou(logits, target)
    iou_mse = F.mse_loss(iou_pred[:, 0], actual_iou)
    total = FOCAL_WEIGHT * focal + dice + iou_mse
    kd = torch.zeros(())
    if teacher_logits is not None and kd_weight > 0:
        kd = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits))
        total = total + kd_weight * kd
    return LossParts(total, float(focal.detach()), float(dice.detach()), float(iou_mse.detach()), float(kd.detach()),
                     float(actual_iou.mean()))


def ambiguous_click_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B: SAM's loss for an ambiguous prompt (one click): the best of the M candidate masks is trained, and the IoU
    head learns every candidate's IoU. logits BxMxLxL, iou_pred BxM, target BxLxL."""
    target = target.float().unsqueeze(1).expand_as(logits)
    b, m = logits.shape[:2]
    flat_logits, flat_target = logits.reshape(b * m, -1), target.reshape(b * m, -1)
    per_mask = (FOCAL_WEIGHT * focal_loss(flat_logits, flat_target) + dice_loss(flat_logits, flat_target)).view(b, m)
    actual_iou = mask_iou(flat_logits, flat_target).view(b, m)
    return per_mask.min(1).values + ((iou_pred - actual_iou) ** 2).mean(1)
