"""Model registry: shapes on 1x28x28 and 3x32x32, features, checkpoints, bad names."""
import pytest
import torch

import common

NAMES = ["convnet-3", "convnet-3-bn", "convnet-2", "resnetap10", "resnet18", "timm:resnet18"]


def info_for(channels, size, classes=10):
    return common.DatasetInfo("t", channels, size, (0.5,) * channels, (0.5,) * channels,
                         [str(i) for i in range(classes)], flip=False)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_registry_shapes(name, shape):
    info = info_for(*shape, classes=7)
    m = common.build_model(name, info).eval()
    x = torch.rand(3, shape[0], shape[1], shape[1])
    logits, feats = m(x), m.features(x)
    assert logits.shape == (3, 7)
    assert feats.ndim == 2 and feats.shape[0] == 3
    # the head is linear on the features: logits come from the penultimate features
    assert torch.allclose(m.net.fc(feats) if hasattr(m.net, "fc") else m.net.net.fc(feats), logits, atol=1e-5)


def test_bn_variant_has_batchnorm_and_plain_has_none():
    info = info_for(1, 28)
    has_bn = lambda m: any(isinstance(l, torch.nn.BatchNorm2d) for l in m.modules())
    assert has_bn(common.build_model("convnet-3-bn", info)) and not has_bn(common.build_model("convnet-3", info))


def test_unknown_model_names():
    for bad in ["convnet", "vgg11", "timm:not_a_model_xyz"]:
        with pytest.raises(common.UserError):
            common.build_model(bad, info_for(1, 28))


def test_check_model_rejects_a_misfit_before_work_starts():
    common.check_model("convnet-3", info_for(1, 28))
    with pytest.raises(common.UserError, match="cannot take 1x28x28"):
        common.check_model("timm:vit_tiny_patch16_224", info_for(1, 28))


def test_classifier_checkpoint_round_trip_and_dataset_check(tmp_path):
    info = info_for(1, 28)
    m = common.build_model("convnet-3-bn", info).eval()
    common.save_classifier(tmp_path / "t.pt", m, "convnet-3-bn", info)
    ck = torch.load(tmp_path / "t.pt", weights_only=True)
    assert ck["model_name"] == "convnet-3-bn" and ck["dataset"] == "t"
    m2 = common.load_classifier(tmp_path / "t.pt", info, "cpu")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m(x), m2(x))
    other = common.DatasetInfo("other", 1, 28, (0.5,), (0.5,), info.classes, flip=False)
    with pytest.raises(common.UserError, match="trained on dataset 't'"):
        common.load_classifier(tmp_path / "t.pt", other, "cpu")
    bigger = common.DatasetInfo("t", 1, 32, (0.5,), (0.5,), info.classes, flip=False)
    with pytest.raises(common.UserError, match="made at this --size"):
        common.load_classifier(tmp_path / "t.pt", bigger, "cpu")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="not a classifier checkpoint"):
        common.load_classifier(tmp_path / "junk.pt", info, "cpu")
