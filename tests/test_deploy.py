"""Export to ONNX / OpenVINO and the torch-free engine: parity with torch, input checks, the search bound."""

import csv
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from conftest import assert_reloads_identically, assert_updates_and_reloads, tiny_model
from mhpc.core.mh_patch_core import (
    MHPatchCore,
    PatchCoreAggregation,
    PatchCoreAlgorithm,
    PatchCoreDistance,
    PatchCoreFeatureReduction,
)
from mhpc.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mhpc.errors import MHPCError, ModelFileError, NotFittedError

import onnxruntime  # noqa: E402,F401 - the test extra installs the deploy engines: missing ones fail, never skip
from mhpc.deploy import DeployedModel  # noqa: E402

COMBOS = list(itertools.product(PatchCoreAlgorithm, PatchCoreFeatureReduction, PatchCoreAggregation, PatchCoreDistance))
PROPOSED = dict(algorithm="ONLINE", aggregation="KMEANS", feature_reduction="PCA", distance="MAHALANOBIS")


def as_model_input(u8: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> what the datasets feed the model (torchvision's own ToDtype + Normalize)."""
    norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return norm(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())


@pytest.fixture(scope="module")
def images(tiny_set):
    _, test, _ = tiny_set
    return np.stack([denormalize(img) for img in test[0]["image"]])  # 5 images, the last with a defect


def fitted(tiny_set, images, **kw):
    model = tiny_model(**kw).fit(tiny_set[0][:1])  # 4 training images: parity does not need a good model
    scores, _ = model.predict_images(as_model_input(images))
    s = np.sort(scores)
    model.threshold_ = float((s[2] + s[3]) / 2)  # two images above, three below, none near it
    return model


def assert_parity(model, images, result, rtol=1e-4):
    scores, maps = model.predict_images(as_model_input(images))
    assert result.scores.shape == scores.shape and result.maps.shape == maps.shape
    np.testing.assert_allclose(result.scores, scores, rtol=rtol, atol=0)
    span = float(maps.max() - maps.min())
    assert np.abs(result.maps - maps).max() <= rtol * span, np.abs(result.maps - maps).max() / span
    np.testing.assert_array_equal(result.is_anomaly, scores >= model.threshold_)
    assert result.is_anomaly.any() and not result.is_anomaly.all()


@pytest.mark.parametrize("alg,red,agg,dist", COMBOS, ids=lambda e: e.name)
def test_onnxruntime_parity_all_combinations(tiny_set, images, tmp_path, alg, red, agg, dist):
    """The model-file round trip of every combination: fit -> save -> load bit-identical, the loaded model
    exports and the engine agrees, then update -> save -> load (tests/test_round_trip.py: presets, the
    unpooled embedding, tiles, HMAC)."""
    model = fitted(tiny_set, images, algorithm=alg, feature_reduction=red, aggregation=agg, distance=dist)
    loaded = assert_reloads_identically(model, tmp_path / "model", as_model_input(images))
    # the folded head exports fastest; it folds the projection too, so every configuration's affine map is
    # exercised; the gather head is checked in test_both_feature_heads_agree_with_torch and the tests below
    path = loaded.export(tmp_path / "m.onnx", head="conv")
    engine = DeployedModel(path)
    assert_parity(model, images, engine.predict(images))
    # dynamic batch: one image at a time gives the same scores
    single = np.concatenate([engine.predict(images[i : i + 1]).scores for i in range(len(images))])
    np.testing.assert_allclose(single, engine.predict(images).scores, rtol=1e-5)
    assert_updates_and_reloads(loaded, tiny_set[0][1:2], tmp_path / "updated", as_model_input(images))


@pytest.mark.parametrize("options", [
    dict(num_nn=3, reweight_num_support=5),
    dict(num_nn=2, squared_distances=True, reweight_num_support=4, **PROPOSED),
], ids=["baseline-nn3-reweight", "proposed-nn2-squared-reweight"])
def test_many_bank_chunks_num_nn_and_reweighting(tiny_set, images, tmp_path, options):
    model = fitted(tiny_set, images, **options)
    # 5 images x 64 patches; a bound of 12 bank rows per block at batch 1 splits the bank into many chunks
    path = model.export(tmp_path / "m.onnx", max_intermediate_bytes=4 * 64 * 12, reference_batch=1)
    info = json.loads((tmp_path / "m.onnx.json").read_text())
    assert info["search"]["chunk_rows"] == 12 and info["search"]["chunks"] >= 4
    assert_parity(model, images, DeployedModel(path).predict(images))


@pytest.mark.parametrize("head", ["gather", "conv"])
def test_both_feature_heads_agree_with_torch(tiny_set, images, tmp_path, head):
    model = fitted(tiny_set, images, feature_reduction="PCA", distance="MAHALANOBIS")
    assert_parity(model, images, DeployedModel(model.export(tmp_path / "m.onnx", head=head)).predict(images))
    assert json.loads((tmp_path / "m.onnx.json").read_text())["head"] == head


@pytest.mark.parametrize("head", ["gather", "conv"])
@pytest.mark.parametrize("reduction,distance", [("PCA", "MAHALANOBIS"), ("NONE", "EUCLIDEAN")])
def test_unpooled_embedding_exports(tiny_set, images, tmp_path, head, reduction, distance):
    """The `best` preset's anomalib-style embedding (all channels, 3x3 average): its width is the channel
    count, not target_embed_dimension, and both heads reproduce it."""
    model = fitted(tiny_set, images, patch_embedding="unpooled", feature_reduction=reduction, distance=distance)
    assert_parity(model, images, DeployedModel(model.export(tmp_path / "m.onnx", head=head)).predict(images))


@pytest.fixture(scope="module")
def proposed_files(tiny_set, images, tmp_path_factory):
    """The proposed configuration, fitted, saved, and exported as ONNX and OpenVINO IR."""
    import openvino  # noqa: F401
    root = tmp_path_factory.mktemp("deploy")
    model = fitted(tiny_set, images, **PROPOSED)
    model.save(root / "model")
    # the OpenVINO file with the folded head: it converts faster than the gathers (the ONNX file keeps 'auto')
    return model, root, model.export(root / "m.onnx"), model.export(root / "m.xml", format="openvino", head="conv")


def test_openvino_parity_proposed(proposed_files, images):
    model, _, _, xml = proposed_files
    assert xml.suffix == ".xml" and xml.with_suffix(".bin").is_file()
    assert_parity(model, images, DeployedModel(xml).predict(images))


def test_openvino_parity_baseline(tiny_set, images, tmp_path):
    import openvino  # noqa: F401
    model = fitted(tiny_set, images)
    path = model.export(tmp_path / "m.xml", format="openvino", head="gather")  # the proposed one is 'conv'
    assert_parity(model, images, DeployedModel(path).predict(images))


def test_engine_runs_without_torch(proposed_files, images, tmp_path):
    model, _, onnx_path, _ = proposed_files
    np.save(tmp_path / "images.npy", images)
    code = textwrap.dedent(f"""
        import sys

        class Block:  # any `import torch` / `import faiss` now raises ImportError
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "faiss"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        import numpy as np
        from mhpc.deploy import DeployedModel
        result = DeployedModel({str(onnx_path)!r}).predict(np.load({str(tmp_path / 'images.npy')!r}))
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "faiss")]
        np.save({str(tmp_path / 'scores.npy')!r}, result.scores)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected, _ = model.predict_images(as_model_input(images))
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-4)


def test_engine_rejects_bad_input(proposed_files, images):
    engine = DeployedModel(proposed_files[2])
    with pytest.raises(MHPCError, match="uint8"):
        engine.predict(images.astype(np.float32))
    with pytest.raises(MHPCError, match=r"\[B, 64, 64, 3\].*\(5, 32, 32, 3\)"):
        engine.predict(images[:, :32, :32])
    with pytest.raises(MHPCError, match=r"\[B, 64, 64, 3\]"):
        engine.predict(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with pytest.raises(MHPCError, match="numpy"):
        engine.predict(images.tolist())
    assert engine.predict(images[0]).scores.shape == (1,)  # one [H, W, 3] image is a batch of one


def test_export_refuses_unfitted_model(tmp_path):
    with pytest.raises(NotFittedError):
        tiny_model().export(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def check_triton_config(model_dir):
    """config.pbtxt parses as Triton's own ModelConfig message (its schema, from tritonclient) and declares
    exactly the graph's inputs and outputs: names, element types, shapes (the dynamic batch as -1)."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.name == model_dir.name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    types = {onnx.TensorProto.UINT8: pb.TYPE_UINT8, onnx.TensorProto.FLOAT: pb.TYPE_FP32,
             onnx.TensorProto.BOOL: pb.TYPE_BOOL}
    declared, actual = [*config.input, *config.output], [*graph.input, *graph.output]
    assert [d.name for d in declared] == [a.name for a in actual] == ["images", "scores", "maps", "is_anomaly"]
    for d, a in zip(declared, actual):
        assert d.data_type == types[a.type.tensor_type.elem_type], d.name
        assert list(d.dims) == [x.dim_value if x.HasField("dim_value") else -1 for x in a.type.tensor_type.shape.dim]


def test_repository_export_refuses_a_config_it_did_not_write(proposed_files, tmp_path, capsys):
    from mhpc.cli import main

    _, root, _, _ = proposed_files
    theirs = tmp_path / "models" / "line7" / "config.pbtxt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text('name: "line7"\nbackend: "python"\n')
    capsys.readouterr()
    assert main(["export", "--model", str(root / "model"), "--repository", str(tmp_path / "models"),
                 "--name", "line7", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{theirs} exists and was not written by mhpc export" in err and len(err.strip().splitlines()) == 1
    assert theirs.read_text() == 'name: "line7"\nbackend: "python"\n' and not (theirs.parent / "1").exists()
    for argv, text in ((["--name", "a/b"], "model name must be"), ([], "exactly one of --out FILE and --repository"),
                       (["--out", str(tmp_path / "x.onnx"), "--name", "n"], "--name needs --repository")):
        repo = ["--repository", str(tmp_path / "models")] if "--out" not in argv and argv else []
        assert main(["export", "--model", str(root / "model"), *repo, *argv]) == 2
        assert text in capsys.readouterr().err, argv


def test_cli_export_and_predict_with_every_engine(proposed_files, images, tmp_path):
    from PIL import Image

    from mhpc.cli import main

    _, root, _, _ = proposed_files
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        # 73 px = round(64 * 256 / 224): the resize keeps it, and the centre crop (offset 4) gives back `img`
        canvas = np.full((73, 73, 3), 127, np.uint8)
        canvas[4:68, 4:68] = img
        Image.fromarray(canvas).save(folder / f"{i}.png")
    # Laid out as model repositories: Triton's (with config.pbtxt) and OpenVINO Model Server's.
    repo = tmp_path / "models"
    assert main(["export", "--model", str(root / "model"), "--repository", str(repo), "--quiet"]) == 0
    assert main(["export", "--model", str(root / "model"), "--format", "openvino", "--repository", str(repo),
                 "--name", "model-ov", "--head", "conv", "--quiet"]) == 0
    assert sorted(p.name for p in (repo / "model-ov" / "1").iterdir()) == ["model.bin", "model.xml", "model.xml.json"]
    assert not (repo / "model-ov" / "config.pbtxt").exists()  # OpenVINO Model Server needs none
    check_triton_config(repo / "model")
    runs = {"torch": root / "model", "onnxruntime": repo / "model" / "1" / "model.onnx",
            "openvino": repo / "model-ov" / "1" / "model.xml"}
    results = {}
    for engine, model_path in runs.items():
        out = tmp_path / engine
        assert main(["predict", "--model", str(model_path), "--images", str(folder), "--out", str(out),
                     "--engine", engine, "--quiet"]) == 0
        rows = list(csv.DictReader(open(out / "scores.csv")))
        maps = np.stack([np.load(out / "maps" / f"{i}.npy") for i in range(len(images))])
        assert len(list((out / "overlays").glob("*.png"))) == len(images)
        results[engine] = (np.array([float(r["score"]) for r in rows]), maps, [r["is_anomalous"] for r in rows])
    scores, maps, verdicts = results["torch"]
    np.testing.assert_allclose(scores, proposed_files[0].predict_images(as_model_input(images))[0], rtol=1e-6)
    assert set(verdicts) == {"0", "1"}
    for engine in ("onnxruntime", "openvino"):
        np.testing.assert_allclose(results[engine][0], scores, rtol=1e-4)
        assert np.abs(results[engine][1] - maps).max() <= 1e-4 * (maps.max() - maps.min())
        assert results[engine][2] == verdicts


def test_export_refuses_a_model_file_that_fails_its_checksum(proposed_files, tmp_path, capsys):
    from mhpc.cli import main

    _, root, _, _ = proposed_files
    data = bytearray((root / "model" / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one bit pattern in the last tensor's bytes
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="integrity"):
        MHPatchCore.load(tmp_path / "bad")
    assert main(["export", "--model", str(tmp_path / "bad"), "--out", str(tmp_path / "x.onnx"), "--quiet"]) == 2
    assert "integrity" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_external_data_when_forced(proposed_files, images, tmp_path):
    model = proposed_files[0]
    path = model.export(tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > (tmp_path / "m.onnx").stat().st_size
    assert json.loads((tmp_path / "m.onnx.json").read_text())["external_data"] is True
    assert_parity(model, images, DeployedModel(path).predict(images))


BOUND_CASES = [
    # (bank rows, dims, bound): the 200k x 1024 bank of the issue (0.8 GB), and the same mechanics at 1/200
    # of the size
    pytest.param(200_000, 1024, 256 * 2**20, id="200k-x-1024-256MiB"),
    pytest.param(20_000, 48, 8 * 2**20, id="20k-x-48-8MiB"),
]


@pytest.mark.parametrize("rows,dims,bound", BOUND_CASES)
def test_search_blocks_stay_under_the_bound(tiny_set, images, tmp_path, rows, dims, bound):
    """At batch 8 one unchunked distance block would be 8 * 64 * rows * 4 B, over the bound (391 MiB for 200k
    rows). Every tensor of the exported graph, shape-inferred at batch 8, stays within the bound."""
    import onnx
    model = tiny_model(pretrain_embed_dimension=dims, target_embed_dimension=dims, aggregation="NONE")
    model.fit(tiny_set[0][:1])
    gen = torch.Generator().manual_seed(0)
    model.memory_bank_ = model.memory_bank_[torch.randint(0, len(model.memory_bank_), (rows,), generator=gen)]
    model.memory_bank_ += 0.01 * torch.randn(model.memory_bank_.shape, generator=gen)
    model.scorer_.fit(model.memory_bank_)
    batch, patches = 8, 64
    assert batch * patches * rows * 4 > bound  # unchunked, the search would break the bound
    # external data: a small graph file with the tensors beside it
    path = model.export(tmp_path / "big.onnx", external_data=True, max_intermediate_bytes=bound, head="conv")
    info = json.loads((tmp_path / "big.onnx.json").read_text())["search"]
    assert info["chunks"] >= 2 and info["chunk_rows"] == bound // (4 * batch * patches)

    graph = onnx.load(str(path), load_external_data=False)
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(graph, data_prop=True)
    sizes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if dims and None not in dims:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
            sizes[value.name] = int(np.prod(dims)) * itemsize
    blocks = [n for n, s in sizes.items() if s >= batch * patches * info["chunk_rows"] * 4]
    assert len(blocks) >= info["chunks"], "the search blocks must be among the shape-inferred tensors"
    assert max(sizes.values()) <= bound, max(sizes.items(), key=lambda kv: kv[1])

    # it runs, across both chunks (two images keep the 200k x 1024 search short; batch 8 is shape-checked above)
    scores = DeployedModel(path).predict(images[3:]).scores
    np.testing.assert_allclose(scores, model.predict_images(as_model_input(images[3:]))[0], rtol=1e-4)


@pytest.mark.parametrize("crop", ["center", "none"])
def test_load_image_gives_exactly_the_pixels_of_predict(tmp_path, crop):
    """Pillow-only loading gives exactly the uint8 pixels that the datasets feed torch (one uint8 geometry),
    for the centre crop and for the letterbox of a non-square image."""
    from PIL import Image

    from mhpc.data.datasets import ImageFilesDataset
    from mhpc.data.transforms import make_preprocessing
    from mhpc.deploy import load_image, preprocessing_contract

    yy, xx = np.mgrid[0:90, 0:120]
    smooth = (127 + 100 * np.sin(xx / 9.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.ones(3)).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.png")
    model = tiny_model()
    model.preprocessing_ = make_preprocessing((64, 64), crop)
    contract = preprocessing_contract(model)
    if crop == "center":
        assert contract["resize_short_side"] == 73 and contract["crop"] == [64, 64]
    ours = load_image(tmp_path / "a.png", contract)
    theirs = denormalize(ImageFilesDataset([tmp_path / "a.png"], preprocessing=contract["mhpc_preprocessing"])[0]["image"])
    assert ours.shape == theirs.shape == (64, 64, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)
    if crop == "none":  # 120 x 90 into 64 x 64: 48 rows of image, 8 rows of mean-colour padding above and below
        assert (ours[:8] == (124, 116, 104)).all() and (ours[-8:] == (124, 116, 104)).all()
        assert not (ours[8:56] == (124, 116, 104)).all(axis=-1).any(axis=-1).all()


def test_letterboxed_model_engines_agree_on_non_square_images_through_the_cli(tiny_set, tmp_path):
    """One uint8 letterbox for every engine: a whole-image model fitted on 96 x 72 images scores images of
    other sizes and aspects (120 x 70, 50 x 90, 64 x 64) within 1e-4 on torch, onnxruntime and OpenVINO."""
    from PIL import Image

    from mhpc.cli import main

    train = torch.cat(tiny_set[0])[:6]
    rng = np.random.default_rng(0)
    good, test = tmp_path / "good", tmp_path / "test"
    good.mkdir()
    test.mkdir()
    for i, img in enumerate(train):
        Image.fromarray(denormalize(img)).resize((96, 72), Image.BILINEAR).save(good / f"{i}.png")
    for i, (w, h) in enumerate([(120, 70), (50, 90), (64, 64), (97, 61)]):
        texture = Image.fromarray(denormalize(train[i % len(train)])).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(texture).copy()
        if i % 2:  # a bright defect in every other image, so the verdicts differ
            pixels[h // 3 : h // 2, w // 3 : w // 2] = rng.integers(200, 256, 3)
        Image.fromarray(pixels).save(test / f"{i}.png")
    model = tmp_path / "model"
    assert main(["fit", "--folder", str(good), "--out", str(model), "--input-size", "64", "64", "--holdout", "0",
                 "--backbone", "resnet18", "--random-init", "--layers", "layer2", "layer3", "--quiet",
                 "--config", str(_write(tmp_path / "c.yaml", "pretrain_embed_dimension: 64\ntarget_embed_dimension: 48\n"
                                                          "coreset_percentage: 0.25\n"))]) == 0
    assert MHPatchCore.load(model).preprocessing_["crop"] == "none"
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx"), "--head", "conv", "--quiet"]) == 0
    assert main(["export", "--model", str(model), "--format", "openvino", "--out", str(tmp_path / "m.xml"),
                 "--head", "conv", "--quiet"]) == 0
    scores = {}
    for engine, path in {"torch": model, "onnxruntime": tmp_path / "m.onnx", "openvino": tmp_path / "m.xml"}.items():
        out = tmp_path / f"out-{engine}"
        assert main(["predict", "--model", str(path), "--images", str(test), "--out", str(out), "--engine", engine,
                     "--quiet"]) == 0
        scores[engine] = np.array([float(r["score"]) for r in csv.DictReader(open(out / "scores.csv"))])
    assert len(scores["torch"]) == 4 and len(set(scores["torch"].round(6))) == 4
    for engine in ("onnxruntime", "openvino"):
        np.testing.assert_allclose(scores[engine], scores["torch"], rtol=1e-4, atol=0)


def _write(path, text):
    path.write_text(text)
    return path
