"""What widths off the multiples of 8 cost per multiply-accumulate on this machine, with the engine as a search uses it.

    python benchmarks/width_cost.py [--images 12800] [--repeats 3] [--device auto]

Trains pairs of networks of the same layout, one with widths in multiples of 8 and one with narrower or odd widths
(a pareto search draws widths in steps of 2 from 4, an accuracy search multiples of 8: search/space.py), for one
epoch on `--images` training images at batch 64 in the engine's default precision, interleaved, `--repeats` times.
Prints per network its MACs per image, images per second and MACs per second (medians), and per pair the ratio of
MACs per second: a ratio under 1 is what the off-8 widths cost per MAC. A search pays it in time per trial, not in
accuracy.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.budget import analyze  # noqa: E402
from models.build import build  # noqa: E402
from models.presets import PRESETS  # noqa: E402
from benchmarks.common import add_data_dir, split_on_device  # noqa: E402
from search.engine import TrainConfig, fit  # noqa: E402
from search.widths import widths as _widths, with_widths as _with_widths  # noqa: E402


def round_to_8(widths: list[int]) -> list[int]:
    return [max(8, 8 * round(w / 8)) for w in widths]


def pairs() -> list[tuple[str, object, str, object]]:
    """(name, multiples-of-8 spec, name, off-8 spec) of the same layout."""
    out = []
    micro = PRESETS["micro"]  # widths 4 and 8
    out.append(("micro at 8", _with_widths(micro, round_to_8(_widths(micro))), "micro (4, 8)", micro))
    compact = PRESETS["compact"]  # widths 8 and 16
    out.append(("compact (8, 16)", compact, "compact at 12", _with_widths(compact, [12] * len(_widths(compact)))))
    out.append(("compact (8, 16)", compact, "compact at 10, 20",
                _with_widths(compact, [w + w // 4 for w in _widths(compact)])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12_800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    add_data_dir(parser)
    args = parser.parse_args()
    device, _, _, data = split_on_device(args.device, args.data_dir, args.images, 500)
    cfg = TrainConfig(epochs=1, batch_size=64)
    nets = {}
    for a, spec_a, b, spec_b in pairs():
        nets[a], nets[b] = spec_a, spec_b
    rates: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.repeats):  # interleaved: drifts of the machine fall on every network alike
        for name, spec in nets.items():
            history = fit(build(spec), None, None, cfg, device=device, data_on_device=data, progress=False)
            rates[name].append(history.epochs[0].images_per_s)
    analyses = {name: analyze(spec) for name, spec in nets.items()}
    macs = {name: a.macs for name, a in analyses.items()}
    print(f"{device}, {args.images:,} images per epoch, batch 64, medians of {args.repeats}")
    print(f"{'network':<20} {'widths':<34} {'params':>7} {'MACs/img':>10} {'img/s':>8} {'GMAC/s':>7}")
    for name, spec in nets.items():
        rate = statistics.median(rates[name])
        widths = ",".join(map(str, _widths(spec)))
        print(f"{name:<20} {widths:<34} {analyses[name].n_params:>7,} {macs[name]:>10,} {rate:>8,.0f} "
              f"{rate * macs[name] / 1e9:>7.2f}")
    print("MACs per second, off-8 widths against multiples of 8 (under 1: slower per MAC):")
    for a, _, b, _ in pairs():
        ratio = (statistics.median(rates[b]) * macs[b]) / (statistics.median(rates[a]) * macs[a])
        print(f"  {b} / {a}: {ratio:.2f}")


if __name__ == "__main__":
    main()
