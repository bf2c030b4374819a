"""Timings and precision: <run>/timings.json phase by phase, the machine's speed probe, what
--amp and --compile resolve to, and the one table of scale-dependent defaults."""
import argparse
import json
from contextlib import nullcontext

import pytest
import torch

import common
from conftest import ROOT, python


def test_timings_replace_phases_keep_skipped_ones_and_sum(tmp_path, capsys):
    t = common.Timings(tmp_path)
    with t.phase("01/teacher") as ph:
        ph.extra = {"epochs": 1}
    common.record_timing(tmp_path, "02/dit-ipc10", 30.0, 1.0, 2.0)
    common.record_timing(tmp_path, "02/dit-ipc10", 60.0, 1.5, 1.5)  # a rerun replaces it
    t.add("02/lgd-ipc10", 5.0, 1.0, skipped=True)  # found finished: nothing recorded
    with pytest.raises(RuntimeError):
        with t.phase("03/default/sets"):
            raise RuntimeError("a phase that fails is not recorded")
    d = json.loads((tmp_path / "timings.json").read_text())
    assert list(d) == ["01/teacher", "02/dit-ipc10"] and d["01/teacher"]["epochs"] == 1
    assert d["02/dit-ipc10"]["seconds"] == 60.0 and d["02/dit-ipc10"]["load_start"] == 1.5
    table = common.timings_table(tmp_path)
    assert "| 02/dit-ipc10 | 1.0 | 60 | 1.50 -> 1.50 |" in table
    assert f"**{d['01/teacher']['seconds'] + 60:.0f}**" in table.splitlines()[-1]
    t.report("test")
    out = capsys.readouterr().out
    assert "02/lgd-ipc10" in out and "skipped: finished by an earlier call" in out
    (tmp_path / "timings.json").write_text("{half")  # unreadable: starts over, job not lost
    common.record_timing(tmp_path, "01/prior", 1.0, 0.5, 0.5)
    assert list(json.loads((tmp_path / "timings.json").read_text())) == ["01/prior"]
    with pytest.raises(common.UserError, match="does not exist"):
        common.timings_table(tmp_path / "none")


@pytest.mark.parametrize("caps,expected", [
    ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
    ({"avx2": True, "avx512_bf16": True}, True),  # Cooper Lake, Zen 4
    ({"amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids
    ({"architecture": "arm64", "neon": True, "bf16": True}, True),  # Graviton 3, Apple M2
    ({"architecture": "arm64", "neon": True}, False),
])
def test_native_bf16_from_torch_capabilities(monkeypatch, caps, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert common.cpu_has_native_bf16() is expected
    device = torch.device("cpu")
    # auto: bf16 for the classifiers where the CPU has native bf16, never for the DiT and VAE
    # (README, Precision: measured); on is on for both, off for neither
    assert common.resolve_amp("auto", device) is expected
    assert common.resolve_amp("auto", device, "prior") is False
    assert common.resolve_amp("on", device) and common.resolve_amp("on", device, "prior")
    assert not common.resolve_amp("off", device)
    _, ctx = common.setup_device("cpu", "auto")
    assert common.amp_of(ctx) == ("bf16" if expected else "off")
    assert common.amp_of(common.prior_ctx(ctx)) == "off"
    _, ctx = common.setup_device("cpu", "on")
    assert common.amp_of(ctx) == "bf16" and common.amp_of(common.prior_ctx(ctx)) == "bf16"


def test_amp_flag_and_cuda_default():
    p = argparse.ArgumentParser()
    common.add_common_args(p, run_help="")
    assert p.parse_args([]).amp == "auto" and p.parse_args(["--amp", "off"]).amp == "off"
    assert common.resolve_amp("auto", torch.device("cuda"))  # bf16 autocast on every GPU
    assert common.resolve_amp("on", torch.device("cuda"))
    assert not common.resolve_amp("off", torch.device("cuda"))
    with pytest.raises(common.UserError, match="--amp must be one of"):
        common.resolve_amp("fp8", torch.device("cpu"))
    assert common.amp_of(nullcontext()) == "off"
    assert common.amp_of(torch.autocast("cpu", dtype=torch.bfloat16)) == "bf16"


def test_auto_on_this_cpu_and_config_json_says_so(tmp_path):
    """auto puts the classifiers in bf16 exactly where this CPU has native bf16, the DiT and VAE
    never; config.json records both, and a classifier's forward pass under the context is bf16
    while the prior's is fp32."""
    device, ctx = common.setup_device("cpu", "auto")
    native = common.cpu_has_native_bf16()
    assert common.amp_of(ctx) == ("bf16" if native else "off")
    assert common.amp_of(common.prior_ctx(ctx)) == "off"
    common.write_config(tmp_path, {"amp": "auto"}, {}, device, ctx)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["amp"] == common.amp_of(ctx) and cfg["amp_prior"] == "off"
    lin = torch.nn.Linear(4, 4)
    with ctx:
        assert lin(torch.randn(2, 4)).dtype == (torch.bfloat16 if native else torch.float32)
        with common.prior_ctx(ctx):  # nested inside the classifiers' autocast: still fp32
            assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_logged_measurements_are_fp32_under_bf16_autocast():
    """accuracy, predict and features (and through them 02's CE, DELT's ranking, 03's student
    accuracies) run in full precision inside a run's bf16 autocast, so a notebook re-deriving a
    logged number in fp32 gets it back to the bit; the caller's autocast holds again after."""
    info, train, _ = common.load_dataset("mnist5k")
    torch.manual_seed(0)
    model = common.build_model("convnet-3", info).eval()  # its weights require grad
    x, split = train.x[:64], common.Split(train.x[:64], train.y[:64])
    ref = [common.predict(model, x), common.features(model, x), common.accuracy(model, split)]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), bf16:
        plain = model(common.to_float(x)).float()  # what an unprotected measurement would see
        got = [common.predict(model, x), common.features(model, x), common.accuracy(model, split)]
        assert torch.is_autocast_enabled("cpu")  # the run's autocast is back for its training
    assert not torch.equal(plain, ref[0])  # bf16 moves the logits: the check below can fail
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and got[2] == ref[2]
    assert not ref[0].requires_grad and not got[1].requires_grad  # no graph kept
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with common.full_precision("cuda"):  # on a GPU: no TF32 either (the flags exist on CPU)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_compile_flag_decides_by_device_length_and_mode(monkeypatch):
    p = argparse.ArgumentParser()
    common.add_common_args(p, run_help="")
    assert p.parse_args([]).compile == "auto"
    assert p.parse_args(["--compile", "off"]).compile == "off"
    cpu, cuda, long = torch.device("cpu"), torch.device("cuda"), common.COMPILE_MIN_STEPS
    monkeypatch.setitem(common.COMPILE, "mode", "auto")
    monkeypatch.setattr(common.shutil, "which", lambda c: "/usr/bin/" + c)
    assert common.compile_for(long, cpu) and not common.compile_for(long - 1, cpu)
    assert not common.compile_for(10 * long, cuda)  # not measured on a GPU: eager there
    monkeypatch.setattr(common.shutil, "which", lambda c: None)  # no C++ compiler: eager
    assert not common.compile_for(long, cpu)
    monkeypatch.setitem(common.COMPILE, "mode", "on")
    assert common.compile_for(1, cpu) and common.compile_for(1, cuda)
    monkeypatch.setitem(common.COMPILE, "mode", "off")
    assert not common.compile_for(10 * long, cpu)
    with pytest.raises(common.UserError, match="--compile must be one of"):
        common.setup_device("cpu", "off", "sometimes")


@pytest.mark.skipif(not common.has_cxx_compiler(),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_fit_repeats_itself_and_its_step_matches_the_eager_step(monkeypatch, tmp_path):
    """The compiled training step gives the same bytes for the same seed, and the eager step's
    logits and gradients up to float rounding (Adam turns rounding of near-zero gradients into
    steps of about the learning rate, so trained weights are compared for repeatability only);
    `model` itself stays eager (its state_dict keys unchanged)."""
    info, train, _ = common.load_dataset("mnist5k")
    data = common.Split(train.x[:96], train.y[:96])
    proto = common.Protocol("hard")  # 03's students' recipe: crops and CutMix

    def trained(mode):
        monkeypatch.setitem(common.COMPILE, "mode", mode)
        torch.manual_seed(0)
        model = common.build_model("convnet-1", info)
        common.fit(model, data, info, proto, epochs=2, seed=3, progress=False)
        return model.state_dict()

    eager, comp, again = trained("off"), trained("on"), trained("on")
    assert list(comp) == list(eager)  # no "_orig_mod." prefix: the module saved is the eager one
    assert all(torch.equal(comp[k], again[k]) for k in comp)
    assert not all(torch.equal(comp[k], eager[k]) for k in comp)  # compiled: another rounding

    torch.manual_seed(0)
    model = common.build_model("convnet-1", info)
    x, y = common.to_float(train.x[:37]), train.y[:37]  # a batch size the fits above never had
    out = []
    for net in (model, torch.compile(model)):
        model.zero_grad()
        logits = net(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        out.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (le, ge), (lc, gc) = out
    assert (le - lc).abs().max() < 1e-4 * le.abs().max()
    # (+1e-6: the conv bias before instance norm has a gradient of zero up to rounding)
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-6 for a, b in zip(ge, gc))
    # a folder made under another --compile resumes: it changes the last bits, not the work
    common.prepare_folder(tmp_path / "job", {"compile": "on", "lr": 0.1}, False, "job")
    common.write_config(tmp_path / "job", {"compile": "on", "lr": 0.1}, {}, torch.device("cpu"))
    assert json.loads((tmp_path / "job" / "config.json").read_text())["compile"] == "on"
    common.prepare_folder(tmp_path / "job", {"compile": "off", "lr": 0.1}, False, "job")


def test_machine_speed_is_measured_once_per_run_and_heads_the_timings_table(tmp_path):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    speed = common.machine_speed(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)  # the probe draws no random numbers
    assert speed["matmul_gflops"] > 0 and speed["conv_gflops"] > 0
    assert common.machine_speed(tmp_path) == speed  # read back, not measured again
    common.record_timing(tmp_path, "01/teacher", 12.0, 0.5, 0.5)
    table = common.timings_table(tmp_path)
    assert f"matmul {speed['matmul_gflops']} GFLOP/s" in table.splitlines()[1]


def test_one_table_of_scale_defaults_feeds_every_script():
    """Every scale-dependent default has a paper and a small column, and the scripts' --help
    prints the value of the table (the help is made from it, not typed beside it)."""
    assert all(len(v) == 2 for v in common.DEFAULTS.values())
    assert common.default("cfg", "paper") == 4.0 and common.default("cfg", "small") == 1.0
    assert common.epochs_for(10, "paper") == 2000 and common.epochs_for(50, "small") == 40
    p = python(ROOT / "01_train_teacher.py", "--help")
    helptext = " ".join(p.stdout.split())
    for name in ("surrogate_model", "surrogate_epochs", "sample_steps", "cfg"):
        paper, small = common.DEFAULTS[name]
        assert str(paper) in helptext and str(small) in helptext, name
