"""Locally aware patch features, as the official PatchCore computes them.

For each layer: unfold a ``patchsize`` neighbourhood (stride 1, same padding), bilinearly resize
the unfolded maps of later layers to the first layer's grid, adaptive-average-pool each patch
vector (1D) to ``pretrain_embed_dimension``; then stack the layers and pool to
``target_embed_dimension``.

The two poolings are fixed averaging windows, i.e. one sparse linear map per layer from the
unfolded vector (C, p, p) to the output. We precompute that map (a few indices and weights per
output) and apply it as K gathers of the unfolded rows. Pooling mixes channels at one location
and bilinear resizing mixes locations within a channel; both are linear, so they commute, and we
resize after pooling (T channels instead of C*p*p). Results equal the official order of operations
up to float rounding (``tests/test_feature_extractor.py`` compares with a transcription of it),
at a fraction of the memory traffic.

``embedding="unpooled"`` is anomalib's variant instead: each layer 3x3 average-pooled (stride 1),
resized to the first layer's grid and concatenated, with no pooling across channels (the
dimension is the sum of the layers' channels).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from mhpc.core.timing import stage_timer
from mhpc.errors import MHPCError


# FX tracing (create_feature_extractor) patches torch.nn.Module.__call__ for the whole process while it runs,
# so a module called from another thread meanwhile is traced by mistake and fails ("module is not installed
# as a submodule"): e.g. `mhpc serve` scoring while it loads a new model. Tracing holds this lock, and code
# that runs modules while another thread may be building a model (the server's engine) holds it too.
FX_TRACE_LOCK = threading.Lock()


def adaptive_windows(d_in: int, d_out: int) -> list[tuple[int, int]]:
    """The [start, end) windows of ``adaptive_avg_pool1d`` from ``d_in`` to ``d_out``."""
    return [((i * d_in) // d_out, math.ceil((i + 1) * d_in / d_out)) for i in range(d_out)]


def pooling_plan(layer_dims: list[int], pretrain_dim: int, target_dim: int):
    """For each layer: (first output, index [K, T_l], weight [K, T_l]) of the composed poolings."""
    final = adaptive_windows(len(layer_dims) * pretrain_dim, target_dim)
    plans = []
    for layer, d_in in enumerate(layer_dims):
        inner = adaptive_windows(d_in, pretrain_dim)
        lo, hi = layer * pretrain_dim, (layer + 1) * pretrain_dim
        rows: dict[int, dict[int, float]] = {}
        for t, (s, e) in enumerate(final):
            for g in range(max(s, lo), min(e, hi)):
                vs, ve = inner[g - lo]
                row = rows.setdefault(t, {})
                for r in range(vs, ve):
                    row[r] = row.get(r, 0.0) + 1.0 / ((e - s) * (ve - vs))
        first, last = min(rows), max(rows)
        k = max(len(v) for v in rows.values())
        index = torch.zeros(k, last - first + 1, dtype=torch.long)
        weight = torch.zeros(k, last - first + 1, dtype=torch.float64)
        for t, row in rows.items():
            for j, (r, w) in enumerate(sorted(row.items())):
                index[j, t - first], weight[j, t - first] = r, w
        plans.append((first, index, weight.float()))
    return plans


EMBEDDINGS = ("pooled", "unpooled")


def embedding_width(channels: tuple[int, ...], embedding: str, target_embed_dimension: int) -> int:
    """The patch feature width: ``target_embed_dimension`` for the pooled embedding, the layers' channels
    summed for the unpooled one (no pooling across channels)."""
    return int(sum(channels)) if embedding == "unpooled" else int(target_embed_dimension)


class PatchFeatureExtractor(nn.Module):
    """Images ``[B, 3, H, W]`` -> patch features ``[B, h*w, target_dim]`` and the grid ``(h, w)``."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: list[str],
        patchsize: int = 3,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        embedding: str = "pooled",
    ) -> None:
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise MHPCError(f"patch_embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
        self.embedding = embedding
        if patchsize < 1 or patchsize % 2 == 0:
            raise MHPCError(f"patchsize must be a positive odd number, got {patchsize}")
        if not layers:
            raise MHPCError("embedding_layers must name at least one layer")
        try:
            # FX-traced graph keeps only the nodes up to the last requested layer.
            with FX_TRACE_LOCK:
                self.body = create_feature_extractor(backbone, return_nodes={l: l for l in layers})
        except Exception as exc:  # noqa: BLE001
            raise MHPCError(f"cannot extract layers {layers} from the backbone: {exc}") from None
        self.body.eval()
        self.layers = list(layers)
        self.patchsize = patchsize
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self._plans: dict[tuple[int, ...], list] = {}

    def _plan(self, channels: tuple[int, ...], device: torch.device) -> list:
        key = channels
        if key not in self._plans:
            dims = [c * self.patchsize**2 for c in channels]
            plans = pooling_plan(dims, self.pretrain_embed_dimension, self.target_embed_dimension)
            self._plans[key] = [(f, i.to(device), w.to(device)) for f, i, w in plans]
        return self._plans[key]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MHPCError(f"images must be [B, 3, H, W] tensors, got shape {tuple(images.shape)}")
        with stage_timer("backbone"):
            fmaps = self.body(images)
        with stage_timer("patch aggregation"):
            if self.embedding == "unpooled":
                return self._aggregate_unpooled(fmaps, images.shape[0])
            return self._aggregate(fmaps, images.shape[0])

    def _aggregate_unpooled(self, fmaps: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        maps = [fmaps[layer] for layer in self.layers]
        ref = maps[0].shape[-2:]
        pad = (self.patchsize - 1) // 2
        parts = []
        for fmap in maps:
            pooled = F.avg_pool2d(fmap, self.patchsize, stride=1, padding=pad)
            if pooled.shape[-2:] != ref:
                pooled = F.interpolate(pooled, size=ref, mode="bilinear", align_corners=False)
            parts.append(pooled)
        out = torch.cat(parts, dim=1)
        return out.permute(0, 2, 3, 1).reshape(batch, ref[0] * ref[1], -1), (int(ref[0]), int(ref[1]))

    def _aggregate(self, fmaps: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, tuple[int, int]]:
        maps = [fmaps[layer] for layer in self.layers]
        ref_h, ref_w = maps[0].shape[-2:]
        # int(): the channel counts are fixed, and a traced export must hit the cached plan
        plans = self._plan(tuple(int(m.shape[1]) for m in maps), maps[0].device)
        out = maps[0].new_zeros(batch, self.target_embed_dimension, ref_h, ref_w)
        pad = (self.patchsize - 1) // 2
        for fmap, (first, index, weight) in zip(maps, plans):
            h, w = fmap.shape[-2:]
            unfolded = F.unfold(fmap, self.patchsize, padding=pad)  # [B, C*p*p, h*w], rows in (C, p, p) order
            acc = unfolded.index_select(1, index[0]).mul_(weight[0][None, :, None])
            for k in range(1, index.shape[0]):
                acc.addcmul_(unfolded.index_select(1, index[k]), weight[k][None, :, None])
            acc = acc.reshape(batch, -1, h, w)
            if (h, w) != (ref_h, ref_w):
                acc = F.interpolate(acc, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
            out[:, first : first + acc.shape[1]] += acc
        return out.permute(0, 2, 3, 1).reshape(batch, ref_h * ref_w, -1), (ref_h, ref_w)
