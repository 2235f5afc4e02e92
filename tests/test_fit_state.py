"""Mergeable fit state, the one-pass statistics, exact PCA, and update() of a fitted model."""

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.decomposition import PCA

from conftest import tiny_model
from mhpc.errors import MHPCError, NotFittedError
from mhpc.fit_state import BankState, FitState
from mhpc.mahalanobis import OnlineCovariance

STATS_CONFIG = dict(algorithm="ONLINE", feature_reduction="PCA", distance="MAHALANOBIS", aggregation="KMEANS")


def _features(model, batches):
    return torch.cat([model._embed(b).reshape(-1, model._embed(b).shape[-1]) for b in batches])


def _assert_same_stats(a: OnlineCovariance, b: OnlineCovariance):
    assert a.count == b.count
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.covariance(), b.covariance(), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- statistics
def test_float32_gemm_covariance_within_1e6_of_float64_on_real_features(tiny_set):
    # Pretrained MobileNetV2 features of the tiny texture set (the offline ImageNet file).
    model = tiny_model(backbone="mobilenet_v2", embedding_layers=None, pretrained=True).begin_fit()
    with torch.no_grad():
        feats = [model._embed(b) for b in tiny_set[0]]
    fast, ref = OnlineCovariance(feats[0].shape[-1]), OnlineCovariance(feats[0].shape[-1])
    for f in feats:
        fast.update(f.reshape(-1, f.shape[-1]))  # float32 GEMM, float64 merge
        ref.update(f.reshape(-1, f.shape[-1]).double())  # float64 throughout
    err = float(torch.linalg.matrix_norm(fast.covariance() - ref.covariance()) / torch.linalg.matrix_norm(ref.covariance()))
    assert err < 1e-6, err
    assert float((fast.mean - ref.mean).abs().max()) < 1e-6 * float(ref.mean.abs().max())


def test_four_shards_merged_equal_one_pass(tiny_set):
    # The shards are made of the same batches as the whole pass (as a distributed fit shards a loader):
    # each batch's Gram matrix is a float32 GEMM, so re-batching would move the result by ~1e-7 relative.
    batches = torch.cat(tiny_set[0]).split(3)
    model = tiny_model(**STATS_CONFIG).begin_fit()
    whole = model.statistics_pass(batches)
    shards = [model.statistics_pass([b]) for b in batches]  # four shards of 3 images
    merged = shards[0]
    for other in shards[1:]:
        assert merged.merge(other) is merged
    _assert_same_stats(merged, whole)
    # The state travels as tensors only, and comes back the same.
    tensors = merged.to_tensors("s.")
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    _assert_same_stats(OnlineCovariance.from_tensors(tensors, "s."), whole)


def test_bank_states_merge_and_round_trip():
    a = BankState("KMEANS", torch.randn(4, 3), torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)
    b = BankState("KMEANS", torch.randn(2, 3), torch.tensor([5.0, 6.0]), 1)
    assert a.merge(b) is a and a.rows.shape == (6, 3) and a.counts.tolist() == [1, 2, 3, 4, 5, 6] and a.n_steps == 3
    back = BankState.from_tensors(a.to_tensors("x."), "x.")
    assert torch.equal(back.rows, a.rows) and torch.equal(back.counts, a.counts) and back.kind == "KMEANS"
    with pytest.raises(MHPCError, match="cannot merge"):
        a.merge(BankState("NONE", torch.randn(2, 3)))
    with pytest.raises(MHPCError, match="counts"):
        BankState("KMEANS", torch.randn(2, 3))


def test_merged_kmeans_shards_reduce_to_the_cluster_count(tiny_set):
    train = tiny_set[0]
    model = tiny_model(algorithm="ONLINE", aggregation="KMEANS", kmeans_clusters=20).begin_fit()
    states = [model.bank_pass([b]) for b in train]  # three shards, each over-clustered
    rows = sum(s.rows.shape[0] for s in states)
    merged = states[0].merge(states[1]).merge(states[2])
    assert merged.rows.shape[0] == rows > 20
    assert float(merged.counts.sum()) == 12 * 64  # each centroid weighs its patches, exactly
    model.finalize_bank(merged)
    assert model.memory_bank_.shape == (20, 48)


def test_update_grows_a_fractional_kmeans_bank_as_a_refit_would(tiny_set):
    train = tiny_set[0]
    a, b = _split(train)
    cfg = dict(algorithm="ONLINE", aggregation="KMEANS", kmeans_clusters=0.1)
    first = tiny_model(**cfg).fit(a)
    assert first.memory_bank_.shape[0] == round(0.1 * 8 * 64)
    upd = first.update(b)
    assert upd.memory_bank_.shape[0] == tiny_model(**cfg).fit(train).memory_bank_.shape[0] == round(0.1 * 12 * 64)
    assert float(upd.fit_state_.bank.counts.sum()) == 12 * 64


# ---------------------------------------------------------------- PCA
@pytest.mark.parametrize("algorithm", ["VANILLA", "ONLINE"])
def test_covariance_pca_subspace_matches_sklearn_full(tiny_set, algorithm):
    train = tiny_set[0]
    model = tiny_model(algorithm=algorithm, feature_reduction="PCA", aggregation="NONE").fit(train)
    with torch.no_grad():
        x = _features(model, train).double().numpy()
    ref = PCA(n_components=0.99, svd_solver="full").fit(x)
    ours = model.reduction_.components_.double().numpy()
    k = ours.shape[0]
    assert k == ref.n_components_
    angle = float(np.max(scipy.linalg.subspace_angles(ours.T, ref.components_.T)))
    # Davis-Kahan: the kept subspace moves by at most ||dSigma|| / gap, dSigma the float32-GEMM error.
    full = np.cov(x.T)
    evals = np.sort(np.linalg.eigvalsh(full))[::-1]
    gap = evals[k - 1] - evals[k] if k < len(evals) else np.inf
    d_sigma = np.linalg.norm(model.fit_state_.statistics.covariance().numpy() - full, 2)
    bound = d_sigma / gap
    assert angle < max(1e-4, bound), f"largest principal angle {angle:.3g} rad; eigengap {gap:.3g}, Davis-Kahan bound {bound:.3g}"
    # sklearn's sign convention too: same components, not just the same span.
    np.testing.assert_allclose(ours, ref.components_, atol=max(1e-3, 10 * bound))


def test_mahalanobis_after_pca_is_a_diagonal_scale(tiny_set):
    model = tiny_model(algorithm="ONLINE", feature_reduction="PCA", distance="MAHALANOBIS", aggregation="NONE")
    model.fit(tiny_set[0])
    chol = model.space_.cholesky_
    assert torch.equal(chol, torch.diag(torch.diagonal(chol)))
    # z = D^-1/2 V^T (x - mu): the whitened training patches have (shrunk) unit variance per dimension.
    var = model.memory_bank_.double().var(dim=0)
    lam = model.reduction_.explained_variance_
    shrunk = 0.99 * lam + 0.01 * lam.mean()
    torch.testing.assert_close(var, lam / shrunk, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("algorithm", ["VANILLA", "ONLINE"])
def test_incremental_solver_still_works(tiny_set, algorithm):
    train, test, _ = tiny_set
    model = tiny_model(algorithm=algorithm, feature_reduction="PCA", distance="MAHALANOBIS",
                       aggregation="KMEANS", pca_solver="incremental").fit(train)
    assert not hasattr(model.reduction_, "_ipca")  # IncrementalPCA was used and finalised
    scores = model.predict(test)[0]
    assert scores[4] > scores[:4].max()
    with pytest.raises(MHPCError, match="pca_solver"):
        tiny_model(pca_solver="svd").fit(train)


# ---------------------------------------------------------------- update
def _split(train):
    return train[:2], train[2:]  # A: 8 images, B: 4 images


@pytest.mark.parametrize("algorithm", ["VANILLA", "ONLINE"])
def test_update_none_euclidean_equals_refit(tiny_set, algorithm):
    train, test, _ = tiny_set
    a, b = _split(train)
    cfg = dict(algorithm=algorithm, aggregation="NONE")
    full = tiny_model(**cfg).fit(train)
    upd = tiny_model(**cfg).fit(a)
    assert upd.update(b) is upd
    assert upd.n_train_images_ == 12 and upd.memory_bank_.shape == full.memory_bank_.shape
    as_set = lambda t: sorted(map(tuple, t.numpy().tolist()))  # noqa: E731
    assert as_set(upd.memory_bank_) == as_set(full.memory_bank_)
    np.testing.assert_array_equal(upd.predict(test)[0], full.predict(test)[0])


def test_update_statistics_and_remapped_bank_equal_refit(tiny_set):
    train, test, _ = tiny_set
    a, b = _split(train)
    # MAHALANOBIS without PCA: the whitened bank must be re-mapped exactly into the new space.
    cfg = dict(algorithm="ONLINE", distance="MAHALANOBIS", aggregation="NONE")
    full = tiny_model(**cfg).fit(train)
    upd = tiny_model(**cfg).fit(a).update(b)
    _assert_same_stats(upd.fit_state_.statistics, full.fit_state_.statistics)
    torch.testing.assert_close(upd.memory_bank_, full.memory_bank_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd.predict(test)[0], full.predict(test)[0], rtol=1e-4)
    # With PCA the basis stays the first fit's; the statistics are still exactly the union's.
    full = tiny_model(**STATS_CONFIG).fit(train)
    upd = tiny_model(**STATS_CONFIG).fit(a).update(b)
    _assert_same_stats(upd.fit_state_.statistics, full.fit_state_.statistics)
    assert upd.memory_bank_.shape[1] == tiny_model(**STATS_CONFIG).fit(a).memory_bank_.shape[1]


DEMO_SIZE = 64


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The demo's synthetic brick texture and pretrained MobileNetV2, at 64 px to stay fast."""
    from mhpc.data.datasets import MVTecDataset
    from mhpc.data.synthetic import generate_benchmark
    from mhpc.data.transforms import make_preprocessing

    # 40 good and 8 per defect: with fewer test images one k-means local optimum moves image AUROC by 0.02.
    root = generate_benchmark(tmp_path_factory.mktemp("demo"), ("brick",), n_train=12, n_test_good=40,
                              n_test_per_defect=8, seed=0)
    pre = make_preprocessing(DEMO_SIZE, "center")  # the MVTec protocol at 64 px, as evaluate uses it
    train = MVTecDataset(root, "brick", "train", preprocessing=pre)
    test = MVTecDataset(root, "brick", "test", preprocessing=pre)
    train_batches = [torch.stack([train[i]["image"] for i in range(j, j + 4)]) for j in range(0, 12, 4)]
    return train_batches, torch.utils.data.DataLoader(test, batch_size=16)


@pytest.mark.parametrize("aggregation", ["GREEDY", "KMEANS"])
def test_update_auroc_close_to_refit(demo_like, aggregation):
    from mhpc.metrics import image_auroc

    train, test = demo_like
    a, b = _split(train)
    # An int cluster count: update keeps the fitted number of centroids (partial_fit continues them).
    cfg = dict(algorithm="ONLINE", feature_reduction="PCA", distance="MAHALANOBIS", aggregation=aggregation,
               backbone="mobilenet_v2", embedding_layers=None, pretrained=True, input_shape=(DEMO_SIZE, DEMO_SIZE),
               kmeans_clusters=100)
    full = tiny_model(**cfg).fit(train)
    upd = tiny_model(**cfg).fit(a).update(b)
    assert abs(upd.memory_bank_.shape[0] - full.memory_bank_.shape[0]) <= 3
    s_full, _, labels, _ = full.predict(test)
    auroc_full, auroc_upd = image_auroc(labels, s_full), image_auroc(labels, upd.predict(test)[0])
    assert auroc_full > 0.9  # the comparison means something only when the refit itself works
    assert abs(auroc_full - auroc_upd) <= 0.02, (auroc_full, auroc_upd)


def test_kmeans_is_one_way_on_every_path(demo_like):
    """VANILLA (its patches held in memory) and ONLINE (streamed) cut the same k-means chunks and build
    the same bank; update agrees with a refit in image AUROC (the mean of three k-means seeds, as one
    k-means local optimum moves it by about 0.01 here)."""
    from mhpc.metrics import image_auroc

    train, test = demo_like
    a, b = _split(train)
    labels = [int(v) for batch in test for v in batch["is_anomaly"]]
    cfg = dict(distance="MAHALANOBIS", aggregation="KMEANS", backbone="mobilenet_v2", embedding_layers=None,
               pretrained=True, input_shape=(DEMO_SIZE, DEMO_SIZE), kmeans_clusters=100,
               kmeans_batch_size=256)  # 3 chunks of 256 patches, streamed or held in memory

    # A fraction, as the presets use (an int count's share per chunk needs the total, which a list of
    # batches does not tell the stream in advance).
    pca = dict(cfg, feature_reduction="PCA", kmeans_clusters=0.13)
    vanilla = tiny_model(**pca, algorithm="VANILLA").fit(train)
    online = tiny_model(**pca, algorithm="ONLINE").fit(train)
    # The same chunks of the same projected patches; only the float rounding of projecting a batch or the
    # whole matrix differs.
    torch.testing.assert_close(vanilla.memory_bank_, online.memory_bank_, rtol=0, atol=1e-4)
    v_auroc, o_auroc = (image_auroc(labels, m.predict(test)[0]) for m in (vanilla, online))
    assert v_auroc > 0.9 and abs(v_auroc - o_auroc) <= 1e-3, (v_auroc, o_auroc)

    def mean_auroc(make):
        return float(np.mean([image_auroc(labels, make(seed).predict(test)[0]) for seed in (0, 1, 2)]))

    # update keeps the first fit's PCA basis, which costs GREEDY as much as KMEANS (about 0.01 here), so
    # the k-means is compared without PCA.
    refit = mean_auroc(lambda seed: tiny_model(**cfg, algorithm="ONLINE", seed=seed).fit(train))
    update = mean_auroc(lambda seed: tiny_model(**cfg, algorithm="ONLINE", seed=seed).fit(a).update(b))
    print(f"image AUROC: VANILLA {v_auroc:.4f}, ONLINE {o_auroc:.4f}; "
          f"without PCA, mean of 3 seeds: refit {refit:.4f}, update {update:.4f}")
    assert refit > 0.9
    assert abs(update - refit) <= 0.01, (update, refit)


def test_update_refuses_wrong_size_and_leaves_the_model_intact(tiny_set):
    train, test, _ = tiny_set
    model = tiny_model(**STATS_CONFIG).fit(train)
    before = model.predict(test)[0]
    bank, stats_m2 = model.memory_bank_.clone(), model.fit_state_.statistics.to_tensors()["m2"].clone()
    with pytest.raises(MHPCError, match="does not match input_shape"):
        model.update([torch.zeros(2, 3, 32, 32)])
    assert torch.equal(model.memory_bank_, bank)
    assert torch.equal(model.fit_state_.statistics.to_tensors()["m2"], stats_m2)
    np.testing.assert_array_equal(model.predict(test)[0], before)
    with pytest.raises(NotFittedError, match="not fitted"):
        tiny_model().update(train)


def test_save_with_and_without_fit_state(tiny_set, tmp_path):
    from mhpc.core.mh_patch_core import MHPatchCore

    train, test, _ = tiny_set
    a, b = _split(train)
    model = tiny_model(**STATS_CONFIG).fit(a)
    model.save(tmp_path / "m.safetensors")
    model.save(tmp_path / "small.safetensors", keep_fit_state=False)
    loaded = MHPatchCore.load(tmp_path / "m.safetensors")
    _assert_same_stats(loaded.fit_state_.statistics, model.fit_state_.statistics)
    np.testing.assert_array_equal(loaded.update(b).predict(test)[0], model.update(b).predict(test)[0])
    small = MHPatchCore.load(tmp_path / "small.safetensors")
    assert (tmp_path / "small.safetensors").stat().st_size < (tmp_path / "m.safetensors").stat().st_size
    with pytest.raises(MHPCError, match="no fit state"):
        small.update(b)


def test_fit_state_object_round_trip(tiny_set):
    model = tiny_model(**STATS_CONFIG).fit(tiny_set[0])
    tensors = model.fit_state_.to_tensors()
    assert all(k.startswith("fit_state.") for k in tensors)
    back = FitState.from_tensors(tensors)
    _assert_same_stats(back.statistics, model.fit_state_.statistics)
    assert torch.equal(back.bank.counts, model.fit_state_.bank.counts) and back.n_images == 12


def test_update_with_the_incremental_solver_keeps_its_basis_and_refit_starts_clean(tiny_set):
    train, test, _ = tiny_set
    a, b = _split(train)
    model = tiny_model(**STATS_CONFIG, pca_solver="incremental").fit(a)
    components = model.reduction_.components_.clone()
    model.update(b)
    assert torch.equal(model.reduction_.components_, components)
    assert model.fit_state_.statistics.count == 12 * 64
    model.fit(a)  # a second fit on the same object starts from scratch
    assert model.fit_state_.statistics.count == 8 * 64 and model.n_train_images_ == 8
