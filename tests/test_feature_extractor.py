"""The patch features must equal the official PatchCore's (amazon-science/patchcore-inspection)."""

import pytest
import torch
import torch.nn.functional as F

from mhpc.core.backbones import load_backbone
from mhpc.core.feature_extractor import PatchFeatureExtractor


def official_embed(fmaps, patchsize, pretrain_dim, target_dim):
    """A line-by-line transcription of the official PatchMaker + _embed + MeanMapper + Aggregator."""
    padding = int((patchsize - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=patchsize, stride=1, padding=padding, dilation=1)

    def patchify(features):
        unfolded = unfolder(features)
        patches = []
        for s in features.shape[-2:]:
            patches.append(int((s + 2 * padding - 1 * (patchsize - 1) - 1) / 1 + 1))
        unfolded = unfolded.reshape(*features.shape[:2], patchsize, patchsize, -1)
        unfolded = unfolded.permute(0, 4, 1, 2, 3)
        return unfolded, patches

    features = [patchify(x) for x in fmaps]
    patch_shapes = [x[1] for x in features]
    features = [x[0] for x in features]
    ref = patch_shapes[0]
    for i in range(1, len(features)):
        _f = features[i]
        dims = patch_shapes[i]
        _f = _f.reshape(_f.shape[0], dims[0], dims[1], *_f.shape[2:])
        _f = _f.permute(0, -3, -2, -1, 1, 2)
        base = _f.shape
        _f = _f.reshape(-1, *_f.shape[-2:])
        _f = F.interpolate(_f.unsqueeze(1), size=(ref[0], ref[1]), mode="bilinear", align_corners=False)
        _f = _f.squeeze(1)
        _f = _f.reshape(*base[:-2], ref[0], ref[1])
        _f = _f.permute(0, -2, -1, 1, 2, 3)
        _f = _f.reshape(len(_f), -1, *_f.shape[-3:])
        features[i] = _f
    features = [x.reshape(-1, *x.shape[-3:]) for x in features]
    pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in features]
    stacked = torch.stack(pooled, dim=1)
    return F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim).reshape(len(stacked), -1), ref


@pytest.mark.parametrize(
    "layers,patchsize,pretrain,target",
    [(["layer2", "layer3"], 3, 96, 80),  # pooling windows straddle the layer boundary
     (["layer2", "layer3"], 3, 1024, 1024),  # the paper's dimensions (up-pooling for small layers)
     (["layer1", "layer2", "layer3"], 5, 200, 333),
     (["layer3"], 1, 64, 64)],
)
def test_matches_official_embedding(layers, patchsize, pretrain, target):
    torch.manual_seed(0)
    backbone = load_backbone("resnet18", pretrained=False, seed=0)
    extractor = PatchFeatureExtractor(backbone, layers, patchsize, pretrain, target)
    images = torch.randn(2, 3, 96, 96)
    ours, grid = extractor(images)
    with torch.no_grad():
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        outs = {"layer1": backbone.layer1(x)}
        outs["layer2"] = backbone.layer2(outs["layer1"])
        outs["layer3"] = backbone.layer3(outs["layer2"])
    ref, ref_grid = official_embed([outs[l] for l in layers], patchsize, pretrain, target)
    assert grid == tuple(ref_grid)
    assert ours.shape == (2, grid[0] * grid[1], target)
    torch.testing.assert_close(ours.reshape(-1, target), ref, rtol=1e-5, atol=1e-6)


def test_forward_stops_after_last_layer():
    backbone = load_backbone("resnet18", pretrained=False)
    extractor = PatchFeatureExtractor(backbone, ["layer2"], 3, 32, 32)
    names = [n.name for n in extractor.body.graph.nodes]
    assert not any("layer3" in n or "layer4" in n or n == "fc" for n in names)


def test_mobilenet_layers_and_shapes():
    backbone = load_backbone("mobilenet_v2", pretrained=False)
    extractor = PatchFeatureExtractor(backbone, ["features.7", "features.10"], 3, 64, 32)
    feats, grid = extractor(torch.randn(1, 3, 64, 64))
    assert grid == (4, 4) and feats.shape == (1, 16, 32)
