"""Train presets with the default recipe and print validation accuracy per epoch.

    python benchmarks/accuracy.py [--presets baseline,small,tiny] [--epochs 15] [--seed 0] [--shards N]
                                  [--data-dir DIR]

Target: `baseline` at least 99.4% validation accuracy at its final epoch within 15 epochs.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.budget import count_params  # noqa: E402
from models.build import build  # noqa: E402
from models.presets import PRESETS  # noqa: E402
from benchmarks.common import add_data_dir, load_or_exit  # noqa: E402
from search.engine import TrainConfig, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="baseline,small,tiny")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    add_data_dir(parser)
    parser.add_argument("--shards", type=int, default=None,
                        help="CPU batch shards (search/engine/whole_step.py); default: the engine's choice")
    args = parser.parse_args()
    mnist = load_or_exit(args.data_dir)
    for name in args.presets.split(","):
        spec = PRESETS[name]
        cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
        start = time.perf_counter()
        history = fit(build(spec), mnist.train, mnist.val, cfg, device=args.device, progress=False, shards=args.shards,
                      on_epoch=lambda r: print(f"  {name} epoch {r.epoch:2d}: val {r.val_acc:.2%} "
                                               f"({r.images_per_s:,.0f} img/s)", flush=True))
        print(f"{name}: {count_params(spec):,} params, final-epoch validation accuracy {history.final_val_acc:.2%} "
              f"after {len(history.epochs)} epochs, {time.perf_counter() - start:.0f} s on {history.device}"
              f"{f' ({history.shards} shards)' if history.shards > 1 else ''}", flush=True)


if __name__ == "__main__":
    main()
