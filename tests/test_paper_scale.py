"""Paper scale on the CPU: ImageNet class maps of WordNet-id folders, 01's run folder default,
gradient checkpointing of the guided steps and 02's scale-dependent defaults."""
import json
import subprocess
import sys

import pytest
import torch

import common
import dit
from conftest import ROOT, TINY_01, assert_user_error, make_image_tree, run_script
from test_dit import save_tiny_latent_pipeline

# real ImageNet-1K WordNet ids (tench, English springer, wing) and their class indices
WNIDS = {"n01440764": 0, "n02102040": 217, "n04592741": 908}


def test_the_shipped_wnid_list_reproduces_the_built_in_maps():
    assert len(common.imagenet_wnids()) == 1000
    for table in (common.IMAGENETTE, common.IMAGEWOOF):
        assert common.imagenet_class_map(sorted(table)) == [table[w] for w in sorted(table)]
    assert common.imagenet_class_map(["n01440764", "cat"]) is None  # every folder or none


def test_wnid_folders_condition_an_imagenet_dit_and_name_the_run(tmp_path):
    """A folder dataset of WordNet-id class folders gets its ImageNet-1K map from the 1,000-id
    list, so a 1000-class DiT takes it; 01 without --run writes runs/<root's name>."""
    tree = make_image_tree(tmp_path / "my-imagenet3", sorted(WNIDS), 4, 2, size=16)
    info, _, _ = common.load_dataset(f"imagefolder:{tree}")
    assert info.class_map == [WNIDS[w] for w in sorted(WNIDS)]
    pipe = save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=1000)
    p = subprocess.run([sys.executable, str(ROOT / "01_train_teacher.py"), "--dataset",
                        f"imagefolder:{tree}", "--model", "convnet-2", "--dit", str(pipe), *TINY_01],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "my-imagenet3"
    assert json.loads((run / "dataset.json").read_text())["class_map"] == [0, 217, 908]
    assert (run / "dit" / "metrics.json").exists()
    prior = dit.load_run_prior(run, common.read_run_info(run), "cpu")
    assert prior.labels(torch.tensor([0, 1, 2])).tolist() == [0, 217, 908]


def test_other_folder_names_still_need_a_dit_of_their_own(tmp_path):
    tree = make_image_tree(tmp_path / "tree", ["a", "b", "c"], 2, 1, size=16)
    pipe = save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=1000)
    p = run_script("01_train_teacher.py", "--dataset", f"imagefolder:{tree}", "--run",
                   tmp_path / "run", "--dit", pipe, *TINY_01, check=False)
    assert_user_error(p, "no class map", "WordNet ids")
    assert not (tmp_path / "run").exists()
