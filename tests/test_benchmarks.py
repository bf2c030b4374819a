"""benchmarks/bench_speed.py at tiny settings on random models, so that it cannot rot: every
section prints, its reference loop makes dit.sample's image, its bf16 table has every model."""
import re

import common
from conftest import ROOT, python


def test_bench_speed_tiny(tmp_path):
    p = python(ROOT / "benchmarks" / "bench_speed.py", "--run", tmp_path / "none", "--images", "4",
               "--ref-images", "2", "--steps", "4", "--ipc", "2", "--epochs", "1",
               "--train-batch", "8", "--reps", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    # the reference one-image loop makes the same image as dit.sample at batch 1, same seed
    diffs = [float(d) for d in re.findall(r"max \|difference\| (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out  # plain and guided
    for line in ("command: ", "matmul 2048^2", "plain  ratio", "guided ratio", "% of peak",
                 "ratio ours / the faster reference", "random initialisation"):
        assert line in out, (line, out[-2000:])
    # ours runs in the precision the scripts' --amp auto gives this CPU, the reference in fp32
    bf16 = common.cpu_has_native_bf16()
    assert f"ours: classifiers {'bf16' if bf16 else 'fp32'}, DiT and VAE fp32 (--amp auto)" \
        in out, out[:1500]
    assert ("under bf16 autocast:" in out) == bf16
    assert f"% of the {'bf16' if bf16 else 'fp32'} conv peak" in out
    assert ("ratio ours compiled / the faster reference" in out) == common.has_cxx_compiler(), \
        out[-1500:]
    # each model's step: GFLOP, fp32 ms, % of the peak, bf16 ms, speed-up = fp32 / bf16
    rows = re.findall(r"^  (\S.*?)\s+([\d.]+)\s+([\d.]+)\s+(\d+) %\s+([\d.]+)\s+([\d.]+)x$",
                      out, re.M)
    assert [r[0].split(",")[0] for r in rows] == [
        "matmul 2048^2", "DiT forward", "DiT forward + backward to x", "DiT training step",
        "VAE decode + backward to z", "VAE training step", "ConvNet-3 training step"], out
    for _, gflop, t32, _, t16, ratio in rows:
        t32, t16, ratio = float(t32), float(t16), float(ratio)
        assert float(gflop) > 0 and t32 > 0 and t16 > 0
        # the times are printed to 0.05 ms, the ratio to 0.005
        assert abs(t32 / t16 - ratio) <= 1.1 * ratio * (0.05 / t32 + 0.05 / t16) + 0.005
