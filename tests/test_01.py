"""01_train_teacher.py end to end in subprocesses: handoff files, resume, pretrained --dit, bad
input."""
import json

import torch

import common
import dit
from conftest import TINY_01, assert_user_error, kill_when, make_image_tree, run_script
from test_dit import save_tiny_latent_pipeline


def test_handoff_files_exist_and_load(tiny_run):
    run, _ = tiny_run
    info = common.DatasetInfo.from_dict(json.loads((run / "dataset.json").read_text()))
    assert info.name == "mnist5k" and info.num_classes == 10
    ck = torch.load(run / "teacher" / "teacher.pt", weights_only=True)
    assert ck["model_name"] == "convnet-1-bn" and ck["dataset"] == "mnist5k"
    teacher = common.load_classifier(run / "teacher" / "teacher.pt", info, "cpu")
    m = json.loads((run / "teacher" / "metrics.json").read_text())
    assert 0 <= m["test_acc"] <= 100 and m["epochs"] == 1
    _, _, test = common.load_dataset("mnist5k")
    assert abs(common.accuracy(teacher, test) - m["test_acc"]) < 1e-6
    cfg = json.loads((run / "teacher" / "config.json").read_text())
    assert {"args", "versions", "git_commit", "device"} <= set(cfg)
    # --amp auto, resolved: the classifiers in bf16 where this CPU has native bf16, the prior fp32
    assert cfg["amp"] == ("bf16" if common.cpu_has_native_bf16() else "off")
    assert cfg["amp_prior"] == "off"
    prior = dit.load_prior(run / "dit", info, "cpu")
    assert prior.transformer.config.num_layers == 1
    dm = json.loads((run / "dit" / "metrics.json").read_text())
    assert dm["samples_per_class"] == 2 and len(dm["sample_acc_per_class"]) == 10
    assert (run / "dit" / "samples.png").stat().st_size > 0
    assert not (run / "dit" / "train_state.pt").exists()
    assert not (run / "teacher" / "train_state.pt").exists()
    timings = json.loads((run / "timings.json").read_text())  # where the time went, per phase
    assert list(timings) == ["01/teacher", "01/prior", "01/sample check"]
    assert all(t["seconds"] >= 0 and "load_start" in t and "load_end" in t
               for t in timings.values())


def test_rerun_skips_finished_work_and_rejects_other_settings(tiny_run):
    run, _ = tiny_run
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01)
    assert "teacher: done earlier" in p.stdout and "dit: done earlier" in p.stdout
    # the closing block says the phases were skipped; timings.json keeps what the work cost
    before = json.loads((run / "timings.json").read_text())
    assert "01/teacher" in p.stdout and "skipped: finished by an earlier call" in p.stdout
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01)
    assert json.loads((run / "timings.json").read_text()) == before
    assert_user_error(run_script("01_train_teacher.py", "--run", run, *TINY_01, "--lr", "0.5",
                                 check=False),
                      "other settings", "--overwrite")


def test_another_cfg_measures_the_finished_prior_again_without_training(tiny_run, tmp_path):
    """--cfg only chooses what 01 measures: the DiT stays, the sample check is redone at the new
    CFG."""
    import shutil
    run = tmp_path / "mnist5k"
    shutil.copytree(tiny_run[0], run)
    safetensors = run / "dit" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = safetensors.read_bytes()
    before = json.loads((run / "dit" / "metrics.json").read_text())
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01, "--cfg", "1.5")
    assert "measuring it again at CFG 1.5" in p.stdout and "dit: resuming" not in p.stdout
    m = json.loads((run / "dit" / "metrics.json").read_text())
    assert m["cfg"] == 1.5 != before["cfg"] and m["train_s"] == before["train_s"]
    assert safetensors.read_bytes() == weights
    assert json.loads((run / "dit" / "config.json").read_text())["args"]["cfg"] == 1.5
    p = run_script("01_train_teacher.py", "--run", run, *TINY_01, "--cfg", "1.5")
    assert "dit: done earlier" in p.stdout


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """Killing 01 mid-teacher and mid-DiT, then rerunning, gives the weights of an uninterrupted
    run."""
    from safetensors.torch import load_file
    args = ["--prior", "pixel", "--model", "convnet-1-bn", "--epochs", "3", "--dit-steps", "60",
            "--dit-width", "32", "--dit-depth", "1", "--dit-ckpt-every", "10",
            "--samples-per-class", "1", "--sample-steps", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_script("01_train_teacher.py", "--run", ref, *args)
    kill_when("01_train_teacher.py", ["--run", run, *args], run / "teacher" / "train_state.pt")
    assert not (run / "teacher" / "metrics.json").exists()
    kill_when("01_train_teacher.py", ["--run", run, *args], run / "dit" / "train_state.pt")
    assert (run / "teacher" / "metrics.json").exists()
    assert not (run / "dit" / "metrics.json").exists()
    p = run_script("01_train_teacher.py", "--run", run, *args)
    assert "teacher: done earlier" in p.stdout and "dit: resuming at step" in p.stdout
    a = torch.load(ref / "teacher" / "teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "teacher" / "teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(ref / "dit" / w), load_file(run / "dit" / w)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_dit_folder_through_01(tmp_path):
    root = make_image_tree(tmp_path / "tree", ["a", "b", "c"], 6, 2, size=16)
    pipe = save_tiny_latent_pipeline(tmp_path / "pipe", num_labels=3)
    run = tmp_path / "run"
    run_script("01_train_teacher.py", "--dataset", f"imagefolder:{root}", "--run", run,
               "--model", "convnet-2", "--dit", pipe, *TINY_01)
    assert json.loads((run / "dit" / "source.json").read_text())["dit"] == str(pipe)
    assert json.loads((run / "dit" / "metrics.json").read_text())["samples_per_class"] == 2
    assert not (run / "dit" / "transformer").exists()


def test_bad_inputs_give_one_line(tmp_path, tiny_run):
    run, _ = tiny_run
    r = tmp_path / "x"

    def bad(*args):
        return run_script("01_train_teacher.py", *args, check=False)
    assert_user_error(bad("--run", r, "--dataset", "nope"), "unknown dataset")
    assert_user_error(bad("--run", r, *TINY_01, "--model", "convnet"), "unknown model")
    assert_user_error(bad("--run", r, "--dataset", f"imagefolder:{tmp_path}/none"),
                      "does not exist")
    assert_user_error(bad("--run", r, *TINY_01, "--dit-patch", "5"), "cannot take 28 px")
    assert_user_error(bad("--run", r, *TINY_01, "--keep-epochs", "9"), "--keep-epochs")
    assert_user_error(bad("--run", r, *TINY_01, "--dit-warmup", "0"),
                      "--dit-warmup", "at least 1")
    assert_user_error(bad("--run", r, *TINY_01, "--dit", tmp_path / "no_dit"), "does not exist")
    assert not r.exists(), "a rejected command must not leave a folder behind"
    # a teacher from another dataset, given with --teacher
    tree = make_image_tree(tmp_path / "tree", ["a", "b"], 4, 2, size=28, mode="L")
    assert_user_error(bad("--run", tmp_path / "y", "--dataset", f"imagefolder:{tree}",
                          "--teacher", run / "teacher" / "teacher.pt", *TINY_01),
                      "trained on dataset 'mnist5k'")
    # a run folder made for another dataset
    assert_user_error(bad("--run", run, "--dataset", f"imagefolder:{tree}", *TINY_01),
                      "was made for dataset 'mnist5k'")
    # a corrupt image in a folder dataset
    (tree / "val" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    assert_user_error(bad("--run", tmp_path / "z", "--dataset", f"imagefolder:{tree}", *TINY_01),
                      "cannot read image")
