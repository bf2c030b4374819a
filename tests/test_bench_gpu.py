"""benchmarks/bench_gpu.py --tiny: every code path of the GPU benchmark, on the CPU, in one
short run with a 2-layer DiT and a small VAE at 32 px (the numbers themselves mean nothing), and
--estimate-only."""
import json

from conftest import ROOT, python


def test_tiny_gpu_benchmark_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    p = python(ROOT / "benchmarks" / "bench_gpu.py", "--tiny", "--device", "cpu", "--out", out,
               timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"plain bf16", "plain fp32", "guided bf16 ckpt", "guided bf16 no-ckpt",
            "guided fp32 ckpt", "reference guided: 1 image, fp32, no TF32"} <= set(res["runs"])
    assert all(r["step_s"] > 0 and r["flop_s"] > 0 for r in res["runs"].values())
    est = res["estimate"]
    for dtype in ("fp32", "bf16"):
        mem = est["activation_bytes_per_guided_sample"][dtype]
        assert 0 < mem["checkpointing"] < mem["no_checkpointing"]
    flops = est["flops_per_sample_step"]
    assert flops["checkpointing"]["guided"] > flops["no_checkpointing"]["guided"] > \
        flops["no_checkpointing"]["plain"] > 0
    assert [(x["task"], x["gpus"]) for x in res["projections"]] == [
        ("ImageNette IPC 100 LGD", 1), ("ImageNette IPC 100 LGD", 8),
        ("ImageNet-1K IPC 50 LGD", 1), ("ImageNet-1K IPC 50 LGD", 8)]
    assert all(x["total_s"] > x["f_cur_s"] > 0 for x in res["projections"])
    assert res["matmul_bf16_flop_s"] > 0 and res["f_cur_images_per_s"] > 0
    assert res["dit_fwd_bwd"]["flops"] > 0 and res["dit_fwd_bwd"]["flop_s"] > 0
    for line in ("ratios:", "projected wall time: T =", "reference loop", "with checkpointing"):
        assert line in p.stdout, line
    # --estimate-only: the meta-device counts alone, the same as the full run's
    only = tmp_path / "estimate.json"
    p = python(ROOT / "benchmarks" / "bench_gpu.py", "--tiny", "--estimate-only", "--out", only)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(only.read_text()) == {"tiny": True, "estimate": est}
