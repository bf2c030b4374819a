"""Model registry: shapes on 1x28x28 and 3x32x32, features, checkpoints, bad names."""
import pytest
import torch

import common
from conftest import load_script

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
    head = m.net.fc if hasattr(m.net, "fc") else m.net.net.fc
    assert torch.allclose(head(feats), logits, atol=1e-5)


def test_bn_variant_has_batchnorm_and_plain_has_none():
    info = info_for(1, 28)
    has_bn = lambda m: any(isinstance(l, torch.nn.BatchNorm2d) for l in m.modules())
    assert has_bn(common.build_model("convnet-3-bn", info))
    assert not has_bn(common.build_model("convnet-3", info))


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


def test_bn_loss_is_zero_at_the_running_statistics_and_weights_the_first_layer():
    """02's BNMatch, DELT's regulariser: plain L2 norms of the mean and variance gaps, x10 on
    the first BN layer, zero when the batch statistics equal the running ones."""
    distill02 = load_script("distill02", "02_distill_stages.py")
    torch.manual_seed(0)
    model = common.build_model("convnet-2-bn", info_for(1, 8, classes=3))
    model = model.eval().requires_grad_(False)
    x = torch.rand(6, 1, 8, 8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 2
    with distill02.BNMatch(model, first_weight=10.0) as bn:
        model(x)
        assert bn.loss().item() > 1e-2  # random running stats differ from the batch's
        stats = []
        # set layer by layer: a later layer's input depends on the earlier running stats
        for m in bns:
            h = m.register_forward_hook(lambda mod, i, o: stats.append(
                (i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=False))))
            model(x)
            h.remove()
            m.running_mean.copy_(stats[-1][0])
            m.running_var.copy_(stats[-1][1])
        model(x)
        assert bn.loss().item() < 1e-4
        bns[1].running_var[5] += 0.5  # plain (not squared) L2 norm, weight 1 after the first layer
        model(x)
        assert bn.loss().item() == pytest.approx(0.5, abs=1e-4)
        bns[1].running_var[5] -= 0.5
        # the first BN layer counts 10x (and shifts the next layer's input)
        bns[0].running_mean[3] += 0.5
        model(x)
        assert bn.terms[0].item() == pytest.approx(0.5, abs=1e-4)
        assert bn.loss().item() == pytest.approx(10 * 0.5 + bn.terms[1].item(), abs=1e-4)
    model(x)  # the hooks are gone after the context
    assert len(bns[0]._forward_hooks) == 0
