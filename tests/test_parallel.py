"""Several processes: torchrun scale-out of 02 and 03 (gloo on the CPU) gives the files and
numbers of one process, and a second writer on a live run's output folder ends at once."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, assert_user_error, kill_when, python, run_script, write_set
from test_02 import files as stage_files

TINY_LGD = ["--method", "lgd", "--ipc", "4", "--stages", "2", "--sample-steps", "4",
            "--guide-epochs", "2", "--guide-model", "convnet-1"]
# one thread per process in both runs: a reduction's order, and so its last bit, can depend on it
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def files(folder):
    """Images, latents and manifests of a 02 folder, timings aside (delt's optimisation too)."""
    return {k: {n: v for n, v in x.items() if not n.endswith("seconds")} if isinstance(x, dict)
            else x for k, x in stage_files(folder).items()}


def torchrun(script, *args, nproc=2):
    # `--` ends torchrun's own options: it would take the scripts' --run for its --run-path
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(nproc), "--", str(ROOT / script),
                        *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env=ONE_THREAD)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def one_process(script, *args):
    p = python(ROOT / script, *args, env=ONE_THREAD, timeout=900)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    dst = tmp_path_factory.mktemp("runpar") / "mnist5k"
    shutil.copytree(tiny_run[0], dst)
    return dst


def test_02_lgd_under_torchrun_equals_one_process(run, tmp_path):
    """--sample-batch 5: stage 1 (plain) in two groups of 5 classes, stage 2 (kappa 3) in ten
    groups of 1, dealt to the two ranks; f_cur trained once on rank 0 and shared."""
    args = ["--run", run, *TINY_LGD, "--sample-batch", "5"]
    one_process("02_distill_stages.py", *args, "--out", tmp_path / "one")
    p = torchrun("02_distill_stages.py", *args, "--out", tmp_path / "two")
    assert "rank 1 of 2" in p.stdout
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert len([f for f in one if f.endswith(".png")]) == 40 and one == two
    a = torch.load(tmp_path / "one" / "stage_02" / "current.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "stage_02" / "current.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert common.read_json(tmp_path / "two" / "config.json")["derived"]["processes"] == 2


@pytest.mark.parametrize("method", ["delt", "random"])
def test_02_delt_batches_and_random_under_torchrun(run, tmp_path, method):
    """delt: five optimisation batches of two classes dealt to the ranks; random: rank 0."""
    extra = ["--ipc", "5", "--iterations", "12", "--round-iterations", "3", "--opt-batch",
             "10"] if method == "delt" else ["--ipc", "4", "--stages", "2"]
    args = ["--run", run, "--method", method, *extra]
    one_process("02_distill_stages.py", *args, "--out", tmp_path / "one")
    torchrun("02_distill_stages.py", *args, "--out", tmp_path / "two")
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert not (tmp_path / "two" / "delt_state").exists()


def test_03_under_torchrun_equals_one_process(tmp_path):
    """Students (set x seed x protocol, baselines, per-stage and redundancy) spread over two
    ranks through the student cache: the same accuracies as one process."""
    info, train, _ = common.load_dataset("mnist5k")
    runs = []
    for name in ("one", "two"):
        r = tmp_path / name
        common.write_json(r / "dataset.json", info.to_dict())
        torch.manual_seed(0)
        common.save_classifier(r / "teacher" / "teacher.pt",
                               common.build_model("convnet-1-bn", info), "convnet-1-bn", info)
        common.write_json(r / "teacher" / "config.json", {"args": {"epochs": 1}})
        common.write_json(r / "teacher" / "metrics.json", {"test_acc": 10.0})
        write_set(r / "distilled" / "dit-ipc2", train, info, "dit", [1, 1])
        runs.append(r)
    args = ["--students", "convnet-1", "--seeds", "2", "--epochs", "1", "--full-epochs", "1",
            "--batch-size", "500", "--baseline-ipcs", "2", "--analyses", "stages,redundancy"]
    one_process("03_evaluate.py", "--run", runs[0], *args)
    torchrun("03_evaluate.py", "--run", runs[1], *args)
    res = [common.read_json(r / "eval" / "default" / "results.json") for r in runs]

    def numbers(d):
        return ([(x["kind"], x["set"], x["protocol"], x["ipc"], x["accs"]) for x in d["rows"]],
                d["redundancy"]["dit-ipc2"]["matrix"],
                [p["accs"] for p in d["stages"]["dit-ipc2"]["points"]], d["students_trained"])
    assert numbers(res[0]) == numbers(res[1])
    assert res[1]["students_trained"] > 4 and res[1]["students_reused"] == res[0]["students_reused"]


# ------------------------------------------------------------------------------------------
# two writers, one folder
# ------------------------------------------------------------------------------------------


def test_lock_names_a_live_owner_and_takes_over_a_dead_ones(tmp_path, capsys):
    folder = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common, time; "
            f"common.lock_folder(__import__('pathlib').Path({str(folder)!r}), 'test'); "
            f"print('locked', flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(common.UserError) as e:
            common.lock_folder(folder, "test")
        msg = str(e.value)
        assert f"pid {owner.pid} on {socket.gethostname()}" in msg and "`python -c`" in msg
    finally:
        owner.kill()
        owner.wait()
    lock = tmp_path / ".out.lock"
    assert lock.exists()  # a killed owner leaves its lock file behind ...
    common.lock_folder(folder, "test")  # ... which the next writer takes over
    assert f"pid {owner.pid}" in capsys.readouterr().out
    assert common.read_json(lock)["pid"] == os.getpid()
    common.unlock_folder(folder)
    assert not lock.exists()


def start_and_pause(script, args, path, timeout=600):
    """Start a numbered script and freeze it (SIGSTOP) once `path` exists: a live writer."""
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    t0 = time.time()
    while not path.exists():
        assert p.poll() is None, f"{script} ended before writing {path.name}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    p.send_signal(signal.SIGSTOP)
    return p


@pytest.mark.parametrize("script", ["01_train_teacher.py", "02_distill_stages.py",
                                    "03_evaluate.py"])
def test_second_writer_ends_at_once_and_a_killed_ones_lock_does_not_block(run, tmp_path,
                                                                           script):
    if script == "01_train_teacher.py":
        target = tmp_path / "run01"
        args = ["--run", target, "--prior", "pixel", "--model", "convnet-1-bn", "--epochs", "1",
                "--dit-steps", "4", "--dit-width", "32", "--dit-depth", "1",
                "--samples-per-class", "1", "--sample-steps", "2"]
        marker = target / "teacher" / "config.json"
    elif script == "02_distill_stages.py":
        target = tmp_path / "lgd"
        args = ["--run", run, *TINY_LGD, "--out", target]
        marker = target / "config.json"
    else:
        target = run / "eval" / "locktest"
        args = ["--run", run, "--name", "locktest", "--students", "convnet-1", "--seeds", "1",
                "--epochs", "1", "--full-epochs", "1", "--baselines", "full", "--analyses",
                "none"]
        marker = target / "config.json"
    first = start_and_pause(script, args, marker)
    try:
        p = run_script(script, *args, check=False)
        assert_user_error(p, "being written by another process", f"pid {first.pid}",
                          socket.gethostname(), script)
    finally:
        first.kill()  # SIGKILL: no clean-up, its lock file stays behind
        first.wait()
    p = run_script(script, *args)
    assert f"taking over the lock of pid {first.pid}" in p.stdout


def test_a_killed_02_leaves_a_lock_the_rerun_takes_over(run, tmp_path):
    out = tmp_path / "dit"
    args = ["--run", run, "--method", "dit", "--ipc", "2", "--stages", "2", "--sample-steps", "3",
            "--out", out]
    kill_when("02_distill_stages.py", args, out / "stage_01" / "manifest.json")
    assert (tmp_path / ".dit.lock").exists()
    p = run_script("02_distill_stages.py", *args)
    assert "taking over the lock" in p.stdout and "stage 1: done earlier" in p.stdout
    assert not (tmp_path / ".dit.lock").exists()  # released at the end


def test_more_ranks_than_gpus_and_01_under_torchrun_are_one_error_line(monkeypatch, tmp_path):
    """torchrun with more processes per host than GPUs ends in one error naming the fix, before
    set_device's "invalid device ordinal"; 01 (one teacher, one DiT) refuses torchrun."""
    monkeypatch.setattr(common, "_RANKS", common.Ranks())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(common.UserError, match="--nproc_per_node 1"):
        common.init_ranks("cuda")
    p = python(ROOT / "01_train_teacher.py", "--run", tmp_path / "r",
               env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert_user_error(p, "without torchrun")
    assert not (tmp_path / "r").exists()
