"""Locally aware patch features, exactly as the official PatchCore computes them.

For each layer: unfold a ``patchsize`` neighbourhood (stride 1, same padding), bilinearly resize
the unfolded maps of later layers to the first layer's grid, adaptive-average-pool each patch
vector (1D) to ``pretrain_embed_dimension``; then stack the layers and pool to
``target_embed_dimension``. ``F.unfold`` orders channels as (C, p, p), which matches the official
``PatchMaker.patchify`` + reshape, so the pooled vectors are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from mhpc.core.timing import stage_timer
from mhpc.errors import MHPCError


class PatchFeatureExtractor(nn.Module):
    """Images ``[B, 3, H, W]`` -> patch features ``[B, h*w, target_dim]`` and the grid ``(h, w)``."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: list[str],
        patchsize: int = 3,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
    ) -> None:
        super().__init__()
        if patchsize < 1 or patchsize % 2 == 0:
            raise MHPCError(f"patchsize must be a positive odd number, got {patchsize}")
        if not layers:
            raise MHPCError("embedding_layers must name at least one layer")
        try:
            # FX-traced graph keeps only the nodes up to the last requested layer.
            self.body = create_feature_extractor(backbone, return_nodes={l: l for l in layers})
        except Exception as exc:  # noqa: BLE001
            raise MHPCError(f"cannot extract layers {layers} from the backbone: {exc}") from None
        self.body.eval()
        self.layers = list(layers)
        self.patchsize = patchsize
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension

    def _patchify(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c, h, w = fmap.shape
        pad = (self.patchsize - 1) // 2
        return F.unfold(fmap, self.patchsize, padding=pad).reshape(b, c * self.patchsize**2, h, w)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MHPCError(f"images must be [B, 3, H, W] tensors, got shape {tuple(images.shape)}")
        with stage_timer("backbone"):
            fmaps = self.body(images)
        with stage_timer("patch aggregation"):
            return self._aggregate(fmaps, images.shape[0])

    def _aggregate(self, fmaps: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        ref_h, ref_w = fmaps[self.layers[0]].shape[-2:]
        pooled = []
        for layer in self.layers:
            patches = self._patchify(fmaps[layer])
            if patches.shape[-2:] != (ref_h, ref_w):
                patches = F.interpolate(patches, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
            b, d = patches.shape[:2]
            flat = patches.permute(0, 2, 3, 1).reshape(b * ref_h * ref_w, 1, d)
            pooled.append(F.adaptive_avg_pool1d(flat, self.pretrain_embed_dimension))
        stacked = torch.cat(pooled, dim=1).reshape(-1, 1, len(self.layers) * self.pretrain_embed_dimension)
        features = F.adaptive_avg_pool1d(stacked, self.target_embed_dimension)
        return features.reshape(batch, ref_h * ref_w, -1), (ref_h, ref_w)
