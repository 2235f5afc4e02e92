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

from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mhpc import params
from mhpc.core import model_file, projection
from mhpc.core.backbones import default_layers, load_backbone
from mhpc.core.feature_extractor import PatchFeatureExtractor
from mhpc.core.reduction import Identity, PCAReduction
from mhpc.core.scoring import NearestNeighbourScorer, anomaly_maps, image_scores
from mhpc.core.threshold import check_quantile, threshold_from_scores
from mhpc.core.timing import stage_timer
from mhpc.data.datasets import batch_targets
from mhpc.data.transforms import dataset_preprocessing
from mhpc.deploy.export import export_model
from mhpc.errors import MHPCError, NotFittedError
from mhpc.fit import driver, passes, ray_executor
from mhpc.fit.state import BankState
from mhpc.mahalanobis import OnlineCovariance, Whitener
from mhpc.memory_bank import ApproximateGreedyCoreset, KeepAll, KMeansBank
from mhpc.params import (BackboneName, PatchCoreAggregation, PatchCoreAlgorithm, PatchCoreDistance,
                         PatchCoreFeatureReduction, parse_backbone, parse_enum)
from mhpc.validation import check_image_batch, check_params

__all__ = ["MHPatchCore", "PatchCoreAlgorithm", "PatchCoreAggregation", "PatchCoreFeatureReduction",
           "PatchCoreDistance", "BackboneName"]


class MHPatchCore:
    """PatchCore anomaly detector.

    Parameters, declared once in mhpc/params.py (the signature repeats them for IDEs; tests/test_params.py
    holds the two equal):
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
        pca_solver: str = "covariance",
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
        values = locals()
        for name in params.PARAMS:
            setattr(self, name, values[name])

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MHPatchCore":
        """A model from a named preset (``paper``, ``proposed``, ``best``; the old name ``seed`` warns and
        means ``proposed``); keyword arguments override it."""
        return cls(**{**params.preset_params(name), **overrides})

    # ------------------------------------------------------------------ configuration
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments in the JSON form of mhpc/params.py (enums by name)."""
        return params.to_json({name: getattr(self, name) for name in params.PARAMS})

    def _validate(self) -> None:
        for name, param in params.PARAMS.items():
            if param.choices is not None:  # the four axes, as enum members in ``algorithm_`` etc.
                setattr(self, f"{name}_", parse_enum(param.choices, getattr(self, name), name))
        self.backbone_ = parse_backbone(self.backbone)
        check_params({name: getattr(self, name) for name in params.PARAMS})
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

    def _make_aggregator(self, expected_patches: int | None = None, chunk_size: int | None = None,
                         alone: bool = True):
        """The aggregation strategy; ``chunk_size`` overrides the configured one (VANILLA: one chunk)."""
        if self.aggregation_ is PatchCoreAggregation.GREEDY:
            return ApproximateGreedyCoreset(
                self.coreset_percentage, chunk_size=chunk_size or int(self.coreset_chunk_size), seed=self.seed,
                device=self.device_, progress=self.progress,
            )
        if self.aggregation_ is PatchCoreAggregation.KMEANS:
            return KMeansBank(self.kmeans_clusters, chunk_size or int(self.kmeans_batch_size), self.seed,
                              expected_patches, alone, progress=self.progress)
        return KeepAll()

    # ------------------------------------------------------------------ data
    def _images(self, batch: Any) -> torch.Tensor:
        return check_image_batch(batch, tuple(self.input_shape)).to(self.device_, torch.float32)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch features [B, P, D]; records the patch grid."""
        features, grid = self.feature_extractor_(images)
        if not torch.isfinite(features).all():
            raise MHPCError("backbone features contain NaN or Inf; check the input normalisation and weights")
        self.grid_shape_ = grid
        return features

    # ------------------------------------------------------------------ fit
    # One schedule for every fit, update and Ray fit: mhpc/fit/driver.py (the contract: mhpc/fit/state.py).
    def fit(self, dataloader: Iterable) -> "MHPatchCore":
        """Builds the memory bank from images of good parts only."""
        self.begin_fit()
        self.preprocessing_ = dataset_preprocessing(dataloader, self.input_shape)
        vanilla = self.algorithm_ is PatchCoreAlgorithm.VANILLA
        return driver.run(self, driver.InProcess(dataloader), hold_in_memory=vanilla)

    def begin_fit(self) -> "MHPatchCore":
        """Validates the parameters and builds the stages; reads no data."""
        self._validate()
        self._build()
        self.is_fitted_ = False
        self.__dict__.pop("fit_state_", None)  # a refit never keeps a previous fit's state
        return self

    def statistics_pass(self, loader: Iterable) -> OnlineCovariance | None:
        """One pass over ``loader``: its raw-feature statistics (None when neither PCA nor MAHALANOBIS is on)."""
        return passes.statistics_pass(self, loader).statistics

    def finalize_statistics(self, stats: OnlineCovariance | None) -> "MHPatchCore":
        """PCA and whitening from merged statistics, folded into one affine map."""
        driver.finalize_statistics(self, stats)
        return self

    def bank_pass(self, loader: Iterable) -> BankState:
        """One pass over ``loader``: the bank state of its projected patches, as one shard of several."""
        return passes.bank_pass(self, loader, alone=False).bank

    def finalize_bank(self, bank: BankState, n_patches: int | None = None) -> "MHPatchCore":
        """Merged bank states reduced to the bank of ``n_patches`` patches; sets the bank and the scorer."""
        driver.finalize_bank(self, bank, n_patches)
        return self

    def update(self, dataloader: Iterable, calibration_loader: Iterable | None = None,
               quantile: float = 0.99) -> "MHPatchCore":
        """Adds images of good parts to a fitted model without refitting (semantics in the README):
        statistics merged and whitening refreshed, the PCA basis kept, every bank vector re-mapped
        exactly into the new space, then the new patches added as the aggregation does. The threshold
        is kept unless ``calibration_loader`` (held-out good images) is given. On any error, the
        calibration's included, the model is left as it was."""
        self._check_fitted()
        return driver.update(self, dataloader, calibration_loader, quantile)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """Feature reduction, then the distance's space: the vectors the bank and the search use."""
        return projection.project(self.reduction_, self.space_, getattr(self, "affine_", None), features)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The projection as one map ``z = x @ A + b`` (float32, CPU; A is [D, R]), or None when it is the
        identity; deployment graphs read it."""
        return projection.affine(self.reduction_, self.space_, getattr(self, "affine_", None))

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
        scores = image_scores(self.scorer_, self.memory_bank_, z, patch, nearest, int(self.reweight_num_support))
        h, w = self.grid_shape_
        with stage_timer("upsampling and blur"):
            maps = anomaly_maps(torch.from_numpy(patch).reshape(b, h, w), tuple(self.input_shape), self.blur_sigma)
        return scores.astype(np.float64), maps

    def predict(self, dataloader: Iterable):
        """Returns ``scores, masks, labels_gt, masks_gt``.

        scores: float per image; masks: [N, H, W] anomaly maps; labels_gt / masks_gt: from dict
        batches (``is_anomaly`` / ``mask``), or None when the loader yields plain tensors.
        """
        self._check_fitted()
        scores, maps, labels, gt_masks = [], [], [], []
        for batch in tqdm(dataloader, desc="Scoring", disable=not self.progress, leave=False):
            s, m = self._score(self._images(batch))
            scores.append(s)
            maps.append(m)
            label, mask = batch_targets(batch)
            labels.append(label)
            gt_masks.append(mask)
        if not scores:
            raise MHPCError("the test data loader yielded no images")
        return (
            np.concatenate(scores),
            np.concatenate(maps),
            None if None in labels else [v for batch_labels in labels for v in batch_labels],
            None if any(m is None for m in gt_masks) else np.concatenate(gt_masks),
        )

    def fit_distributed(self, images: Any, ray_address: str | None = None, num_shards: int | None = None,
                        batch_size: int = 8, max_retries: int = 3,
                        preprocessing: dict[str, Any] | None = None) -> "MHPatchCore":
        """Fits on a Ray cluster (extra ``distributed``): the fit schedule with the image paths split into
        shards, one task per shard (``mhpc.fit.ray_executor.fit_distributed`` has the arguments)."""
        return ray_executor.fit_distributed(self, images, ray_address, num_shards, batch_size, max_retries,
                                            preprocessing)

    # ------------------------------------------------------------------ threshold
    def calibrate(self, dataloader: Iterable, quantile: float = 0.99) -> "MHPatchCore":
        """Sets ``threshold_`` from images of good parts that were not used for fit."""
        check_quantile(quantile)
        return self.calibrate_scores(self.predict(dataloader)[0], quantile)

    def calibrate_scores(self, scores: np.ndarray, quantile: float = 0.99) -> "MHPatchCore":
        """Sets ``threshold_`` (and ``threshold_stats_``) from image scores of held-out good images (e.g.
        each image's max over tiles)."""
        self.threshold_, self.threshold_stats_ = threshold_from_scores(scores, quantile)
        return self

    # ------------------------------------------------------------------ deployment and persistence
    def export(self, path: str | PathLike, format: str = "onnx", **kwargs: Any):
        """One graph from uint8 image to score, map and verdict (ONNX or OpenVINO IR) plus ``path.json``;
        see ``mhpc.deploy.export.export_model`` for the options. Needs ``pip install 'mhpc[deploy]'``."""
        return export_model(self, path, format=format, **kwargs)

    def save(self, path: str | PathLike, keep_fit_state: bool = True, key: bytes | None = None) -> "Path":
        """Writes the configuration and all fitted state to a safetensors file, atomically.

        ``keep_fit_state`` (default True) also stores the fit state that ``update`` needs: the raw
        feature statistics (D x D float64) and the k-means counts, a few MB; without it the file is
        smaller but the model can only be refitted, not updated. ``key``: the HMAC key that signs it
        (default: ``MHPC_MODEL_KEY``, if set). Returns the file written."""
        return model_file.save_model(self, path, keep_fit_state, key)

    @classmethod
    def load(cls, path: str | PathLike, device: torch.device | str | None = None,
             key: bytes | None = None) -> "MHPatchCore":
        """A fitted model from a file ``save`` wrote, after its checksum, signature (with ``key``; default
        ``MHPC_MODEL_KEY``, if set) and schema are checked and its backbone weights are proved the same
        (``device``: where to run it; default the saved one)."""
        parts = model_file.read_model_file(path, key)
        config = params.from_json(parts.config)
        if device is not None:
            config["device"] = str(device)
        model = cls(**config)
        model._validate()
        model._build()
        return model_file.restore(model, parts)


MHPatchCore.__doc__ += params.docstring() + "\n    "
