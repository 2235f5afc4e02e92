"""MHPatchCore: PatchCore with four swappable axes (algorithm, reduction, aggregation, distance).

``MHPatchCore`` only wires small strategy objects together:
  feature extraction  -> ``PatchFeatureExtractor`` (an nn.Module)
  feature_reduction   -> ``Identity`` / ``PCAReduction``
  distance            -> ``Identity`` / ``Whitener`` (z = L^-1 (x - mu))
  aggregation         -> ``ApproximateGreedyCoreset`` / ``KMeansBank`` / ``KeepAll``
  scoring             -> ``NearestNeighbourScorer`` + ``anomaly_maps``
The algorithm axis decides whether those strategies are fitted at once (VANILLA) or streamed
batch by batch (ONLINE).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from os import PathLike
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mhpc.core.backbones import BackboneName, default_layers, load_backbone, parse_backbone
from mhpc.core.feature_extractor import PatchFeatureExtractor
from mhpc.core.reduction import Identity, PCAReduction
from mhpc.core.timing import stage_timer
from mhpc.core.scoring import NearestNeighbourScorer, anomaly_maps, reweight_image_scores
from mhpc.errors import MHPCError, NotFittedError
from mhpc.mahalanobis import Whitener
from mhpc.memory_bank import ApproximateGreedyCoreset, KeepAll, KMeansBank

__all__ = [
    "MHPatchCore",
    "PatchCoreAlgorithm",
    "PatchCoreAggregation",
    "PatchCoreFeatureReduction",
    "PatchCoreDistance",
    "BackboneName",
]


class PatchCoreAlgorithm(str, enum.Enum):
    VANILLA = "VANILLA"
    ONLINE = "ONLINE"


class PatchCoreAggregation(str, enum.Enum):
    GREEDY = "GREEDY"
    KMEANS = "KMEANS"
    NONE = "NONE"


class PatchCoreFeatureReduction(str, enum.Enum):
    NONE = "NONE"
    PCA = "PCA"


class PatchCoreDistance(str, enum.Enum):
    EUCLIDEAN = "EUCLIDEAN"
    MAHALANOBIS = "MAHALANOBIS"


def parse_enum(enum_cls: type[enum.Enum], value: Any, param: str) -> Any:
    """Accepts the enum member or its name (case-insensitive)."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls[str(value).upper()]
    except KeyError:
        raise MHPCError(f"invalid {param} {value!r}; choose one of {[m.name for m in enum_cls]}") from None


def _dataset_len(loader: Iterable) -> int | None:
    """The number of images of a DataLoader over a sized dataset, else None."""
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None


class MHPatchCore:
    """PatchCore anomaly detector.

    Parameters beyond the README example (all optional):
      pca_variance_ratio: variance PCA keeps (0.99).
      kmeans_clusters: int count or float fraction of the training patches (0.01).
      num_nn: neighbours averaged for a patch score (1, as the paper).
      squared_distances: score with squared L2 like the official code (False: plain L2, Eq. 6).
      reweight_num_support: b of the paper's Eq. 7 image-score reweighting; 0 turns it off (0).
      covariance_shrinkage: Ledoit-Wolf style shrinkage of Sigma towards (tr/d) I (0.01).
      covariance_jitter: relative diagonal jitter before Cholesky, escalated on failure (0.0).
      pca_batch_size, kmeans_batch_size, coreset_chunk_size: streaming batch sizes in patches.
      pretrained / weights_path: ImageNet weights via torchvision, a local file, or random init.
      blur_sigma: Gaussian sigma of the anomaly map (4, as the paper).
      patch_embedding: "pooled" (the paper's pooled 1024-d) or "unpooled" (anomalib's 3x3 average, all channels).
      seed: every random choice (projection, start points, k-means, random-init backbone).
      progress: tqdm progress bars.
    """

    def __init__(
        self,
        backbone: BackboneName | str = BackboneName.wideresnet50,
        embedding_layers: list[str] | None = None,
        device: torch.device | str = "cpu",
        input_shape: tuple[int, int] = (224, 224),
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patchsize: int = 3,
        algorithm: PatchCoreAlgorithm | str = PatchCoreAlgorithm.VANILLA,
        aggregation: PatchCoreAggregation | str = PatchCoreAggregation.GREEDY,
        feature_reduction: PatchCoreFeatureReduction | str = PatchCoreFeatureReduction.NONE,
        distance: PatchCoreDistance | str = PatchCoreDistance.EUCLIDEAN,
        coreset_percentage: float = 0.1,
        pca_variance_ratio: float = 0.99,
        kmeans_clusters: int | float = 0.01,
        num_nn: int = 1,
        squared_distances: bool = False,
        reweight_num_support: int = 0,
        covariance_shrinkage: float = 0.01,
        covariance_jitter: float = 0.0,
        pca_batch_size: int = 2048,
        kmeans_batch_size: int = 4096,
        coreset_chunk_size: int = 50_000,
        pretrained: bool = True,
        weights_path: str | PathLike | None = None,
        blur_sigma: float = 4.0,
        seed: int = 0,
        progress: bool = True,
        patch_embedding: str = "pooled",
    ) -> None:
        self.backbone = backbone
        self.embedding_layers = embedding_layers
        self.device = device
        self.input_shape = input_shape
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.patchsize = patchsize
        self.algorithm = algorithm
        self.aggregation = aggregation
        self.feature_reduction = feature_reduction
        self.distance = distance
        self.coreset_percentage = coreset_percentage
        self.pca_variance_ratio = pca_variance_ratio
        self.kmeans_clusters = kmeans_clusters
        self.num_nn = num_nn
        self.squared_distances = squared_distances
        self.reweight_num_support = reweight_num_support
        self.covariance_shrinkage = covariance_shrinkage
        self.covariance_jitter = covariance_jitter
        self.pca_batch_size = pca_batch_size
        self.kmeans_batch_size = kmeans_batch_size
        self.coreset_chunk_size = coreset_chunk_size
        self.pretrained = pretrained
        self.weights_path = weights_path
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.progress = progress
        self.patch_embedding = patch_embedding

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MHPatchCore":
        """A model from a named preset (``paper``, ``seed``, ``best``); keyword arguments override it."""
        from mhpc.config import preset_params

        return cls(**{**preset_params(name), **overrides})

    # ------------------------------------------------------------------ configuration
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments as JSON-friendly values (enums by name)."""
        cfg = {}
        for key in _CONFIG_KEYS:
            value = getattr(self, key)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, PathLike):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            cfg[key] = value
        cfg["device"] = str(self.device)
        return cfg

    def _validate(self) -> None:
        self.algorithm_ = parse_enum(PatchCoreAlgorithm, self.algorithm, "algorithm")
        self.aggregation_ = parse_enum(PatchCoreAggregation, self.aggregation, "aggregation")
        self.feature_reduction_ = parse_enum(PatchCoreFeatureReduction, self.feature_reduction, "feature_reduction")
        self.distance_ = parse_enum(PatchCoreDistance, self.distance, "distance")
        self.backbone_ = parse_backbone(self.backbone)
        if not 0.0 < float(self.coreset_percentage) <= 1.0:
            raise MHPCError(f"coreset_percentage must be in (0, 1], got {self.coreset_percentage}")
        if not 0.0 < float(self.pca_variance_ratio) <= 1.0:
            raise MHPCError(f"pca_variance_ratio must be in (0, 1], got {self.pca_variance_ratio}")
        if len(tuple(self.input_shape)) != 2 or min(self.input_shape) < 8:
            raise MHPCError(f"input_shape must be (height, width) of at least 8 pixels, got {self.input_shape}")
        for name in ("pretrain_embed_dimension", "target_embed_dimension", "num_nn", "pca_batch_size",
                     "kmeans_batch_size", "coreset_chunk_size"):
            if int(getattr(self, name)) < 1:
                raise MHPCError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.reweight_num_support) < 0:
            raise MHPCError(f"reweight_num_support must be >= 0, got {self.reweight_num_support}")
        if self.blur_sigma < 0:
            raise MHPCError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        try:
            self.device_ = torch.device(self.device)
        except RuntimeError:
            raise MHPCError(f"invalid device {self.device!r}") from None
        if self.device_.type == "cuda" and not torch.cuda.is_available():
            raise MHPCError("device='cuda' was requested but CUDA is not available")

    def _build(self) -> None:
        layers = list(self.embedding_layers) if self.embedding_layers else default_layers(self.backbone_)
        backbone = load_backbone(self.backbone_, self.pretrained, self.weights_path, self.seed)
        self.feature_extractor_ = PatchFeatureExtractor(
            backbone, layers, self.patchsize, int(self.pretrain_embed_dimension), int(self.target_embed_dimension),
            self.patch_embedding,
        ).to(self.device_)
        if self.feature_reduction_ is PatchCoreFeatureReduction.PCA:
            self.reduction_ = PCAReduction(self.pca_variance_ratio, int(self.pca_batch_size))
        else:
            self.reduction_ = Identity()
        if self.distance_ is PatchCoreDistance.MAHALANOBIS:
            self.space_ = Whitener(self.covariance_shrinkage, self.covariance_jitter)
        else:
            self.space_ = Identity()  # EUCLIDEAN: search in the (reduced) feature space itself
        self.scorer_ = NearestNeighbourScorer(self.num_nn, self.squared_distances)

    def _make_aggregator(self, expected_patches: int | None = None):
        if self.aggregation_ is PatchCoreAggregation.GREEDY:
            return ApproximateGreedyCoreset(
                self.coreset_percentage, chunk_size=int(self.coreset_chunk_size), seed=self.seed,
                device=self.device_, progress=self.progress,
            )
        if self.aggregation_ is PatchCoreAggregation.KMEANS:
            return KMeansBank(self.kmeans_clusters, int(self.kmeans_batch_size), self.seed, expected_patches)
        return KeepAll()

    # ------------------------------------------------------------------ data
    def _images(self, batch: Any) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
            images = images[0]
        if not isinstance(images, torch.Tensor):
            raise MHPCError(f"a batch must be an image tensor or a dict with 'image'; got {type(images).__name__}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise MHPCError(
                f"images must be [B, 3, H, W] (RGB, normalised); got shape {tuple(images.shape)}. "
                "Convert grayscale or RGBA images to RGB first."
            )
        if tuple(images.shape[-2:]) != tuple(self.input_shape):
            raise MHPCError(f"image size {tuple(images.shape[-2:])} does not match input_shape {tuple(self.input_shape)}")
        if not torch.isfinite(images).all():
            raise MHPCError("images contain NaN or Inf values")
        return images.to(self.device_, torch.float32)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch features [B, P, D]; records the patch grid."""
        features, grid = self.feature_extractor_(images)
        if not torch.isfinite(features).all():
            raise MHPCError("backbone features contain NaN or Inf; check the input normalisation and weights")
        self.grid_shape_ = grid
        return features

    def _stream(self, loader: Iterable, desc: str):
        """Yields patch features [B*P, D] for each batch."""
        seen = 0
        for batch in tqdm(loader, desc=desc, disable=not self.progress, leave=False):
            images = self._images(batch)
            seen += images.shape[0]
            feats = self._embed(images)
            yield feats.reshape(-1, feats.shape[-1])
        if seen == 0:
            raise MHPCError("the training data loader yielded no images")
        self.n_train_images_ = seen

    # ------------------------------------------------------------------ fit
    def fit(self, dataloader: Iterable) -> "MHPatchCore":
        """Builds the memory bank from images of good parts only."""
        self._validate()
        self._build()
        if self.algorithm_ is PatchCoreAlgorithm.VANILLA:
            self._fit_vanilla(dataloader)
        else:
            self._fit_online(dataloader)
        self.scorer_.fit(self.memory_bank_)
        self.is_fitted_ = True
        return self

    def _fit_vanilla(self, loader: Iterable) -> None:
        feats = self._collect(loader)
        self.reduction_.fit(feats)
        self.space_.fit(self.reduction_.transform(feats))
        self._finish_projection()
        self.memory_bank_ = self._make_aggregator().run(self._project(feats)).cpu().contiguous()

    def _collect(self, loader: Iterable) -> torch.Tensor:
        """All patch features [N*P, D] on the CPU. With a sized dataset the matrix is allocated once and
        filled, so the features are held once rather than twice (list + concatenation)."""
        n_images = _dataset_len(loader)
        parts: list[torch.Tensor] = []
        out, row = None, 0
        for feats in self._stream(loader, "Extracting features"):
            if n_images is not None and out is None:
                per_image = self.grid_shape_[0] * self.grid_shape_[1]
                out = torch.empty(n_images * per_image, feats.shape[1], dtype=feats.dtype)
            if out is not None and row + feats.shape[0] <= out.shape[0]:
                out[row : row + feats.shape[0]] = feats
                row += feats.shape[0]
            else:  # unsized loader, or a dataset that yields more than its length says
                parts.append(feats.cpu())
        if out is None:
            return torch.cat(parts)
        return torch.cat([out[:row], *parts]) if parts else out[:row]

    def _fit_online(self, loader: Iterable) -> None:
        """Streams the loader once per stage that needs the previous stage's final state:
        IncrementalPCA, then the covariance (on reduced features), then the memory bank (on z).
        Aggregation NONE needs no pass of its own: it keeps the features of the last stats pass
        (they form the bank anyway) and projects them at the end.
        """
        stats_stages = []
        if self.feature_reduction_ is PatchCoreFeatureReduction.PCA:
            stats_stages.append("pca")
        if self.distance_ is PatchCoreDistance.MAHALANOBIS:
            stats_stages.append("covariance")
        keep_all = self.aggregation_ is PatchCoreAggregation.NONE
        self.n_passes_ = max(1, len(stats_stages) + (0 if keep_all and stats_stages else 1))
        collected: list[torch.Tensor] = []
        total_patches: int | None = None
        for i, stage in enumerate(stats_stages):
            last = i == len(stats_stages) - 1
            total_patches = 0
            for feats in self._stream(loader, f"Pass {i + 1}/{self.n_passes_}: {stage}"):
                total_patches += feats.shape[0]
                if stage == "pca":
                    self.reduction_.partial_fit(feats)
                    if keep_all and last:
                        collected.append(feats.cpu())  # projected once PCA is final
                else:
                    reduced = self.reduction_.transform(feats)
                    self.space_.partial_fit(reduced)
                    if keep_all and last:
                        collected.append(reduced.cpu())
            (self.reduction_ if stage == "pca" else self.space_).finalize()
        self._finish_projection()

        if keep_all and stats_stages:
            bank = torch.cat(collected)  # raw features after a PCA pass, reduced ones after a covariance pass
            bank = self._project(bank) if stats_stages[-1] == "pca" else self.space_.transform(bank)
            self.memory_bank_ = bank.float().contiguous()
            return
        n_images = self._count_images(loader) if total_patches is None else None
        aggregator = None
        for feats in self._stream(loader, f"Pass {self.n_passes_}/{self.n_passes_}: memory bank"):
            if aggregator is None:  # the first batch tells the patch grid
                if total_patches is None and n_images is not None:
                    total_patches = n_images * self.grid_shape_[0] * self.grid_shape_[1]
                aggregator = self._make_aggregator(total_patches)
            aggregator.partial_fit(self._project(feats))
        self.memory_bank_ = aggregator.finalize().float().contiguous()

    def _count_images(self, loader: Iterable) -> int | None:
        """Image count for a fractional k-means cluster count, without running the backbone."""
        if self.aggregation_ is not PatchCoreAggregation.KMEANS or not isinstance(self.kmeans_clusters, float):
            return None
        n_images = _dataset_len(loader)
        return n_images if n_images is not None else sum(self._images(b).shape[0] for b in loader)

    def _finish_projection(self) -> None:
        """Once PCA and whitening are final, fold PCA + whitening into one float32 affine map
        (L^-1 W by triangular solve, computed once), so scoring needs one matrix product."""
        self.affine_ = None
        if isinstance(self.reduction_, PCAReduction) and isinstance(self.space_, Whitener):
            a, b = self.space_.compose(*self.reduction_.affine())
            self.affine_ = (a.float().T.contiguous().to(self.device_), b.float().to(self.device_))

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """Feature reduction, then the distance's space: the vectors the bank and the search use."""
        if getattr(self, "affine_", None) is not None:
            a_t, b = (t.to(features.device) for t in self.affine_)
            return torch.addmm(b, features, a_t)
        return self.space_.transform(self.reduction_.transform(features))

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError("this MHPatchCore is not fitted yet; call fit() or MHPatchCore.load() first")

    @torch.no_grad()
    def predict_images(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores one batch of images: (image scores [B], anomaly maps [B, H, W] at input size)."""
        self._check_fitted()
        return self._score(self._images(images))

    def _score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self._embed(images)
        b, p, d = feats.shape
        with stage_timer("projection"):
            z = self._project(feats.reshape(-1, d))
        with stage_timer("nearest-neighbour search"):
            patch, nearest = self.scorer_.patch_scores(z)
        patch = patch.reshape(b, p)
        if int(self.reweight_num_support) > 0:
            image_scores = reweight_image_scores(
                self.scorer_, self.memory_bank_, z.cpu().numpy().reshape(b, p, -1), patch,
                nearest.reshape(b, p), int(self.reweight_num_support),
            )
        else:
            image_scores = patch.max(axis=1)
        h, w = self.grid_shape_
        with stage_timer("upsampling and blur"):
            maps = anomaly_maps(torch.from_numpy(patch).reshape(b, h, w), tuple(self.input_shape), self.blur_sigma)
        return image_scores.astype(np.float64), maps

    def predict(self, dataloader: Iterable):
        """Returns ``scores, masks, labels_gt, masks_gt``.

        scores: float per image; masks: [N, H, W] anomaly maps; labels_gt / masks_gt: from dict
        batches (``is_anomaly`` / ``mask``), or None when the loader yields plain tensors.
        """
        self._check_fitted()
        scores, maps, labels, gt_masks = [], [], [], []
        has_labels = has_masks = True
        for batch in tqdm(dataloader, desc="Scoring", disable=not self.progress, leave=False):
            s, m = self._score(self._images(batch))
            scores.append(s)
            maps.append(m)
            if isinstance(batch, dict) and "is_anomaly" in batch:
                labels.extend(int(v) for v in torch.as_tensor(batch["is_anomaly"]).reshape(-1).tolist())
            else:
                has_labels = False
            if isinstance(batch, dict) and "mask" in batch:
                gt = torch.as_tensor(batch["mask"])
                gt_masks.append(gt.reshape(gt.shape[0], *gt.shape[-2:]).cpu().numpy())
            else:
                has_masks = False
        if not scores:
            raise MHPCError("the test data loader yielded no images")
        return (
            np.concatenate(scores),
            np.concatenate(maps),
            labels if has_labels else None,
            np.concatenate(gt_masks) if has_masks else None,
        )

    # ------------------------------------------------------------------ threshold
    def calibrate(self, dataloader: Iterable, quantile: float = 0.99) -> "MHPatchCore":
        """Sets ``threshold_`` from images of good parts that were not used for fit."""
        if not 0.0 < quantile <= 1.0:
            raise MHPCError(f"quantile must be in (0, 1], got {quantile}")
        scores = self.predict(dataloader)[0]
        self.threshold_ = float(np.quantile(scores, quantile))
        self.threshold_stats_ = {
            "quantile": quantile, "count": int(scores.size), "mean": float(scores.mean()),
            "std": float(scores.std()), "max": float(scores.max()), "threshold": self.threshold_,
        }
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | PathLike) -> None:
        """Writes the configuration and all fitted state to a safetensors file, atomically."""
        from mhpc.core.model_file import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path: str | PathLike, device: torch.device | str | None = None) -> "MHPatchCore":
        from mhpc.core.model_file import load_model

        return load_model(path, device)


_CONFIG_KEYS = [
    "backbone", "embedding_layers", "device", "input_shape", "pretrain_embed_dimension",
    "target_embed_dimension", "patchsize", "algorithm", "aggregation", "feature_reduction", "distance",
    "coreset_percentage", "pca_variance_ratio", "kmeans_clusters", "num_nn", "squared_distances",
    "reweight_num_support", "covariance_shrinkage", "covariance_jitter", "pca_batch_size",
    "kmeans_batch_size", "coreset_chunk_size", "pretrained", "weights_path", "blur_sigma", "seed", "progress",
    "patch_embedding",
]
