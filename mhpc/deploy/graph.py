"""The exported graph as a plain ``nn.Module``: uint8 images -> image scores, anomaly maps, verdict.

Everything after the backbone is fixed once the model is fitted:
  feature head   the patch neighbourhood, both poolings and the bilinear resize (the model's own
                 ``PatchFeatureExtractor._aggregate``, or the same map folded into one convolution per
                 layer), then the projection (PCA / whitening) as one affine map
  search         exact squared L2 against constant bank chunks: |z|^2 - 2 z.B + |B|^2, clamped at 0,
                 then min / top-k per chunk and across chunks
  image score    max patch score, or the paper's Eq. 7 reweighting
  anomaly map    bilinear upsampling to the input size, then the Gaussian as a separable convolution
                 with scipy's kernel (truncate=4) and scipy's 'reflect' border (a constant gather)
Every step is a plain ONNX operator. This module needs torch; the runtime side (``engine.py``) does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mhpc.errors import MHPCError

# The bound on any one intermediate of the search, at the reference batch size.
DEFAULT_MAX_INTERMEDIATE_BYTES = 256 * 2**20
DEFAULT_REFERENCE_BATCH = 8


def scipy_gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D kernel ``scipy.ndimage.gaussian_filter`` uses (``_gaussian_kernel1d``, order 0)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return phi / phi.sum()


def reflect_index(n: int, radius: int) -> np.ndarray:
    """Source indices of scipy's 'reflect' border (d c b a | a b c d | d c b a), any radius."""
    i = np.arange(-radius, n + radius)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)


class GaussianBlur(nn.Module):
    """scipy.ndimage.gaussian_filter(sigma, truncate=4.0, mode='reflect') on [B, H, W], separable."""

    def __init__(self, sigma: float, size: tuple[int, int]) -> None:
        super().__init__()
        kernel = scipy_gaussian_kernel(sigma)
        r = (len(kernel) - 1) // 2
        k = torch.from_numpy(kernel).float()
        # scipy correlates; the kernel is symmetric, so conv2d (a correlation) matches.
        self.register_buffer("ky", k.reshape(1, 1, -1, 1))
        self.register_buffer("kx", k.reshape(1, 1, 1, -1))
        self.register_buffer("iy", torch.from_numpy(reflect_index(size[0], r)))
        self.register_buffer("ix", torch.from_numpy(reflect_index(size[1], r)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps[:, None]
        x = F.conv2d(x.index_select(2, self.iy), self.ky)
        x = F.conv2d(x.index_select(3, self.ix), self.kx)
        return x[:, 0]


class BankSearch(nn.Module):
    """Exact k-NN (squared L2) against a constant bank held as chunks of ``-2 B^T`` and ``|B|^2``.

    Every chunk's distance block is [queries, chunk]; the chunk size keeps each block under the bound
    at the reference batch. ``gather`` returns bank rows by global index without concatenating chunks.
    """

    def __init__(self, bank: torch.Tensor, chunk_rows: int) -> None:
        super().__init__()
        bank = bank.detach().cpu().float()
        self.n, self.dim = bank.shape
        self.offsets = list(range(0, self.n, chunk_rows))
        for i, start in enumerate(self.offsets):
            part = bank[start : start + chunk_rows]
            self.register_buffer(f"bt{i}", (-2.0 * part).T.contiguous())  # exact: a power of two
            self.register_buffer(f"bn{i}", (part * part).sum(1))

    def _chunks(self):
        for i, start in enumerate(self.offsets):
            yield start, getattr(self, f"bt{i}"), getattr(self, f"bn{i}")

    def search(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z [Q, d] -> (squared distances [Q, k] ascending, global indices [Q, k])."""
        k = min(k, self.n)
        zn = (z * z).sum(1, keepdim=True)
        values, indices = [], []
        for start, bt, bn in self._chunks():
            d2 = (torch.mm(z, bt) + bn + zn).clamp_min(0.0)
            if k == 1:
                v, i = d2.min(dim=1, keepdim=True)
            else:
                v, i = torch.topk(d2, min(k, bt.shape[1]), dim=1, largest=False)
            values.append(v)
            indices.append(i + start)
        if len(values) == 1:
            index = indices[0]
        else:
            v, i = torch.cat(values, 1), torch.cat(indices, 1)
            if k == 1:
                _, pos = v.min(dim=1, keepdim=True)
            else:
                _, pos = torch.topk(v, k, dim=1, largest=False)
            index = torch.gather(i, 1, pos)
        # The found neighbours' distances recomputed as |z - m|^2, exact to float32 rounding (the
        # expansion above loses digits to cancellation), as NearestNeighbourScorer.search does.
        diff = self.gather(index) - z[:, None, :]
        return (diff * diff).sum(-1), index

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows for global indices of any shape -> [*index.shape, d]."""
        out = None
        for start, bt, _ in self._chunks():
            n = bt.shape[1]
            local = (index - start).clamp(0, n - 1)
            rows = bt.index_select(1, local.reshape(-1)).T.reshape(*index.shape, self.dim) * -0.5
            inside = ((index >= start) & (index < start + n))[..., None]
            rows = torch.where(inside, rows, torch.zeros_like(rows))
            out = rows if out is None else out + rows
        return out


def _head_matrices(extractor: nn.Module, channels: list[int]) -> list[torch.Tensor]:
    """Per layer, the linear map [embedding dims, C * p * p] from the unfolded p x p neighbourhood (rows in
    (C, p, p) order) to the patch embedding: the paper's two poolings, or the unpooled embedding's
    per-channel p x p average (zero padding counted, as ``avg_pool2d``), its channels stacked by layer."""
    from mhpc.core.feature_extractor import pooling_plan

    p = extractor.patchsize
    if extractor.embedding == "unpooled":
        total, offset, out = sum(channels), 0, []
        for c in channels:
            dense = torch.zeros(total, c * p * p, dtype=torch.float64)
            for j in range(c):
                dense[offset + j, j * p * p:(j + 1) * p * p] = 1.0 / (p * p)
            out.append(dense)
            offset += c
        return out
    plans = pooling_plan([c * p * p for c in channels], extractor.pretrain_embed_dimension,
                         extractor.target_embed_dimension)
    out = []
    for (first, index, weight), c in zip(plans, channels):
        dense = torch.zeros(extractor.target_embed_dimension, c * p * p, dtype=torch.float64)
        cols = torch.arange(index.shape[1]) + first
        for k in range(index.shape[0]):
            dense[cols, index[k]] += weight[k].double()
        out.append(dense)
    return out


class FoldedHead(nn.Module):
    """The patch head as one convolution per layer: unfold + both poolings + the projection are one
    linear map from the layer's p x p neighbourhood to the output, and bilinear resizing commutes with
    it (it mixes locations, not channels). Dense, so it pays off only for small channel counts."""

    def __init__(self, extractor: nn.Module, channels: list[int], affine) -> None:
        super().__init__()
        p = extractor.patchsize
        self.patchsize = p
        for li, dense in enumerate(_head_matrices(extractor, channels)):
            t = dense.shape[0]
            if affine is not None:
                dense = affine[0].double().T @ dense
            self.register_buffer(f"w{li}", dense.float().reshape(-1, channels[li], p, p).contiguous())
        bias = affine[1] if affine is not None else torch.zeros(t)
        self.register_buffer("bias", bias.float().reshape(1, -1, 1, 1))
        self.n_layers = len(channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        ref = maps[0].shape[-2:]
        out = None
        for li, fmap in enumerate(maps):
            y = F.conv2d(fmap, getattr(self, f"w{li}"), padding=(self.patchsize - 1) // 2)
            if y.shape[-2:] != ref:
                y = F.interpolate(y, size=ref, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        out = out + self.bias
        return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, out.shape[1])


class DeployGraph(nn.Module):
    """uint8 [B, H, W, 3] RGB at the model's input size -> (scores [B], maps [B, H, W][, is_anomaly [B]])."""

    def __init__(
        self,
        model: Any,
        head: str = "gather",
        max_intermediate_bytes: int = DEFAULT_MAX_INTERMEDIATE_BYTES,
        reference_batch: int = DEFAULT_REFERENCE_BATCH,
    ) -> None:
        super().__init__()
        if head not in ("gather", "conv"):
            raise MHPCError(f"head must be 'gather' or 'conv', got {head!r}")
        extractor = model.feature_extractor_
        self.body = extractor.body
        self.extractor = extractor
        self.layers = list(extractor.layers)
        self.input_shape = tuple(int(s) for s in model.input_shape)
        self.grid = tuple(int(s) for s in model.grid_shape_)
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        with torch.no_grad():
            fmaps = self.body(torch.zeros(1, 3, *self.input_shape))
        channels = [int(fmaps[l].shape[1]) for l in self.layers]
        self.unpooled = extractor.embedding == "unpooled"
        affine = model.affine()  # PCA + whitening as one map, or None
        self.head = head
        if head == "conv":
            self.folded = FoldedHead(extractor, channels, affine)
        elif affine is not None:
            self.register_buffer("proj_a", affine[0])
            self.register_buffer("proj_b", affine[1])
        self.has_affine = affine is not None
        bank = model.memory_bank_.detach().cpu().float()
        patches = self.grid[0] * self.grid[1]
        # one block of the search is [batch * patches, chunk] float32
        self.chunk_rows = max(1, min(bank.shape[0], max_intermediate_bytes // (4 * reference_batch * patches)))
        self.search = BankSearch(bank, self.chunk_rows)
        self.num_nn = int(model.num_nn)
        self.squared = bool(model.squared_distances)
        self.reweight = int(model.reweight_num_support)
        self.blur = GaussianBlur(model.blur_sigma, self.input_shape) if model.blur_sigma > 0 else None
        threshold = getattr(model, "threshold_", None)
        self.has_threshold = threshold is not None
        if self.has_threshold:
            self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> projected patch features [B * P, d]."""
        x = images.permute(0, 3, 1, 2).to(torch.float32).mul(1.0 / 255.0)
        x = (x - self.mean) / self.std  # the same ops as torchvision's ToDtype + Normalize
        fmaps = self.body(x)
        if self.head == "conv":
            feats = self.folded([fmaps[l] for l in self.layers])
            return feats.reshape(-1, feats.shape[-1])
        aggregate = self.extractor._aggregate_unpooled if self.unpooled else self.extractor._aggregate
        feats, _ = aggregate(fmaps, x.shape[0])
        feats = feats.reshape(-1, feats.shape[-1])
        if self.has_affine:
            feats = torch.addmm(self.proj_b, feats, self.proj_a)
        return feats

    def forward(self, images: torch.Tensor):
        batch = images.shape[0]
        z = self.features(images)
        sq, idx = self.search.search(z, self.num_nn)
        dist = sq if self.squared else torch.sqrt(sq)
        patch = dist.mean(dim=1).reshape(batch, -1)  # [B, P]
        if self.reweight > 0:
            scores = self._reweight(z.reshape(batch, patch.shape[1], -1), patch, idx[:, 0].reshape(batch, -1))
        else:
            scores = patch.max(dim=1).values
        maps = patch.reshape(batch, 1, *self.grid)
        maps = F.interpolate(maps, size=self.input_shape, mode="bilinear", align_corners=False)[:, 0]
        if self.blur is not None:
            maps = self.blur(maps)
        if self.has_threshold:
            return scores, maps, scores >= self.threshold
        return scores, maps

    def _reweight(self, z: torch.Tensor, patch: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7 as ``mhpc.core.scoring.reweight_image_scores`` computes it."""
        worst = patch.argmax(dim=1, keepdim=True)  # [B, 1]
        s_star = torch.gather(patch, 1, worst)[:, 0]
        m_test = torch.gather(z, 1, worst[..., None].expand(-1, 1, z.shape[2]))[:, 0]  # [B, d]
        m_star = self.search.gather(torch.gather(nearest, 1, worst))[:, 0]  # [B, d]
        _, support = self.search.search(m_star, self.reweight)  # [B, b], m* itself first
        diffs = m_test[:, None, :] - self.search.gather(support)
        dists = torch.sqrt((diffs * diffs).sum(-1))
        weights = torch.softmax(dists, dim=1)
        return (1.0 - weights[:, 0]) * s_star


def chunk_count(graph: DeployGraph) -> int:
    return len(graph.search.offsets)


def bound_note(max_intermediate_bytes: int, reference_batch: int) -> str:
    return f"{max_intermediate_bytes / 2**20:g} MiB per search block at batch {reference_batch}"


__all__ = ["DeployGraph", "GaussianBlur", "BankSearch", "scipy_gaussian_kernel", "reflect_index"]
