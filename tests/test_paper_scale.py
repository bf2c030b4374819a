"""Paper scale on the CPU: ImageNet class maps of WordNet-id folders, 01's run folder default,
gradient checkpointing of the guided steps and 02's scale-dependent defaults."""
import json

import torch

import common
import dit
from conftest import ROOT, TINY_01, assert_user_error, make_image_tree, python, run_script
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
    p = python(ROOT / "01_train_teacher.py", "--dataset", f"imagefolder:{tree}",
               "--model", "convnet-2", "--dit", pipe, *TINY_01, cwd=tmp_path)
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


def test_checkpointing_recomputes_the_blocks_of_guided_steps_and_changes_no_bit(tmp_path):
    """With checkpointing the DiT blocks and VAE decoder blocks run again in the backward pass of
    every guided step (their activations were not kept), never in plain steps; the images and
    latents are bit for bit those made without it."""
    info = common.DatasetInfo("toy", 3, 16, (0.5,) * 3, (0.5,) * 3, ["a", "b", "c"], flip=True,
                              class_map=[0, 1, 2])
    prior = dit.load_prior(save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=3), info, "cpu")
    torch.manual_seed(0)
    terms = dit.learnability_terms(common.build_model("convnet-1", info).eval(),
                                   common.build_model("convnet-1-bn", info).eval(), 0.5)
    calls = {"dit block": 0, "vae block": 0}

    def count(name):  # a pre-hook: a recomputation may stop before the block's end
        return lambda *_: calls.__setitem__(name, calls[name] + 1)
    prior.transformer.transformer_blocks[0].register_forward_pre_hook(count("dit block"))
    prior.vae.decoder.up_blocks[0].register_forward_pre_hook(count("vae block"))
    y, out = torch.tensor([0, 1, 2]), {}
    for on in (False, True):
        prior.set_checkpointing(on)
        calls.update({"dit block": 0, "vae block": 0})
        guide = dit.Guidance(terms=terms, scale=15.0, c0=0.05, window=(13, 25))  # t = 2, 1 of 3..0
        out[on] = dit.sample(prior, y, [1, 2, 3], steps=4, guidance=guide, progress=False)
        # 4 steps (+ 2 recomputed) of the DiT; 2 guided decodes (+ 2 recomputed) + the final one
        assert calls == ({"dit block": 6, "vae block": 5} if on else
                         {"dit block": 4, "vae block": 3}), (on, calls)
    assert torch.equal(out[False][0], out[True][0]) and torch.equal(out[False][1], out[True][1])


def dry_run(run, *args):
    p = run_script("02_distill_stages.py", "--run", run, "--dry-run", *args)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_02_defaults_follow_the_scale(tiny_run):
    run = tiny_run[0]
    small = dry_run(run, "--method", "lgd")
    assert (small["sample_batch"], small["checkpointing"]) == (120, False)
    assert small["settings"]["guide_model"] == "convnet-3"
    paper = dry_run(run, "--method", "lgd", "--scale", "paper", "--guide-model", "convnet-3")
    assert (paper["sample_batch"], paper["checkpointing"]) == (30, True)
    off = dry_run(run, "--method", "dit", "--scale", "paper", "--checkpointing", "off")
    assert (off["sample_batch"], off["checkpointing"]) == (15, False)
    given = dry_run(run, "--method", "dit", "--checkpointing", "on", "--sample-batch", "7")
    assert (given["sample_batch"], given["checkpointing"]) == (7, True)
    # the paper's f_cur is a ConvNet-6 (IGD and LGD at 256 px): too deep for 28 px digits
    p = run_script("02_distill_stages.py", "--run", run, "--method", "lgd", "--scale", "paper",
                   "--dry-run", check=False)
    assert_user_error(p, "convnet-6")


def test_02_checkpointing_is_recorded_but_not_a_setting(tiny_run, tmp_path):
    """Checkpointing trades memory for compute: the same bytes with and without it, recorded in
    config.json, and a rerun with the other value resumes the folder."""
    out = tmp_path / "lgd"
    args = ["--run", tiny_run[0], "--method", "lgd", "--out", out, "--ipc", "2", "--stages", "2",
            "--sample-steps", "3", "--guide-epochs", "1", "--guide-model", "convnet-1"]
    run_script("02_distill_stages.py", *args, "--checkpointing", "on")
    cfg = common.read_json(out / "config.json")
    assert cfg["derived"]["checkpointing"] is True and cfg["derived"]["sample_batch"] == 120
    before = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.png"))}
    p = run_script("02_distill_stages.py", *args, "--checkpointing", "off")
    assert p.stdout.count("done earlier") == 2
    run_script("02_distill_stages.py", *args, "--checkpointing", "off", "--overwrite")
    assert common.read_json(out / "config.json")["derived"]["checkpointing"] is False
    after = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.png"))}
    assert after == before and len(before) == 20
