"""Stand-in distilled sets for 03 until 02 lands: `random` (real images) and `dit` (plain CFG DiT samples).

Writes <out>/distilled/{random,dit}-ipc{10,50}/ in 02's layout (5 stages each) and copies dataset.json and
teacher/ from --run, so 03 can be run on <out> without touching --run.
Usage: .venv/bin/python tests/demo_sets.py --run runs/mnist5k --out runs/mnist5k-eval
"""
import argparse
import shutil
from pathlib import Path

import torch

from bench_eval import write_set
import common as C


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/mnist5k"))
    p.add_argument("--out", type=Path, default=Path("runs/mnist5k-eval"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "dataset.json", args.out)
    shutil.copytree(args.run / "teacher", args.out / "teacher", dirs_exist_ok=True)
    info = C.DatasetInfo.from_dict(C.read_json(args.out / "dataset.json"))
    _, train, _ = C.load_dataset(info.name, info.root, info.size)
    for ipc in (10, 50):
        write_set(args.out / "distilled" / f"random-ipc{ipc}", train, info, "random", [ipc // 5] * 5,
                  seed=args.seed + 100 + ipc)
    # plain DiT sampling (CFG 4, 50 DDPM steps): 50 per class in 5 stages of 10; IPC 10 takes 2 of each stage
    prior = C.load_prior(args.run / "dit", info, "cpu")
    y = torch.arange(info.num_classes).repeat(50)  # (500,), class-major within each of 50 rounds
    imgs, _ = C.sample_images(prior, y, gen=torch.Generator().manual_seed(args.seed), batch_size=250)
    for ipc in (10, 50):
        folder, index = args.out / "distilled" / f"dit-ipc{ipc}", 0
        per_stage = ipc // 5
        for k in range(5):
            rounds = range(k * 10, k * 10 + per_stage)  # stage k draws from its own 10 rounds
            for c in range(info.num_classes):
                for r in rounds:
                    C.save_png(imgs[r * info.num_classes + c], folder / f"stage_{k + 1:02d}" / info.classes[c]
                               / f"{index:06d}.png")
                    index += 1
            C.write_json(folder / f"stage_{k + 1:02d}" / "manifest.json", {"stage": k + 1, "ipc": per_stage})
        C.write_json(folder / "config.json", {"args": {"method": "dit", "ipc": ipc, "stages": 5, "seed": args.seed,
                                                       "note": "stand-in made by tests/demo_sets.py"}})
    print(f"wrote {sorted(p.name for p in (args.out / 'distilled').iterdir())} under {args.out}")


if __name__ == "__main__":
    main()
