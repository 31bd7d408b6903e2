"""Training throughput: the usual DataLoader loop against budgetnas's engine, on the same model, in one run.

    python benchmarks/train_throughput.py [--presets baseline,small,compact] [--images 12800] [--repeats 3] [--ablate]

(a) the usual loop: torchvision's MNIST dataset, a DataLoader, RandomRotation(+-7 deg), ToTensor, Normalize,
    batch 32, SGD with Nesterov momentum, float32, torch's own nn.Dropout; in a fresh process of its own, so that it
    runs with malloc as it comes (the engine tunes it: search/engine/runtime.py, tune_cpu_allocator);
(b) the engine: the whole training split as a tensor on the device, batches by index, batched random affine
    augmentation, its default batch size and precision (search/engine/), budgetnas's Dropout (models/build.py),
    on a CPU each batch split across the threads (search/engine/whole_step.py).
Prints images per second (median of the repeats, interleaved), the ratio (b)/(a), and the engine's achieved GFLOP/s
(3 x 2 x forward MACs per image: forward plus a backward of about twice its cost) next to this machine's measured
matmul peak in the engine's precision. On a CPU with native bfloat16 also the engine in float32; with --ablate also
the engine with torch's nn.Dropout and, on a CPU, unsharded. Target on a 2-core CPU: the engine at least 3x the usual
loop. On CUDA, also seconds per epoch, against the ordinary eager loop and at batch 128 and 256.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.budget import analyze  # noqa: E402
from models.build import build  # noqa: E402
from models.presets import PRESETS  # noqa: E402
from benchmarks.common import add_data_dir, load_or_exit  # noqa: E402
from search.data import MEAN, STD, resolve_root  # noqa: E402
from search.engine import TrainConfig, fit, resolve_device  # noqa: E402
from search.engine.runtime import use_bf16  # noqa: E402
from search.engine.whole_step import cpu_shards  # noqa: E402


def with_torch_dropout(model: nn.Sequential) -> nn.Sequential:
    """The model with torch's own nn.Dropout in place of budgetnas's (models/build.py)."""
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Dropout):
            model[i] = nn.Dropout(layer.p)
    return model


def usual_loop(spec, root, n_images: int, device) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomRotation(7), transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    loader = torch.utils.data.DataLoader(datasets.MNIST(str(root), train=True, transform=tf), batch_size=32,
                                         shuffle=True)
    model = with_torch_dropout(build(spec)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 5:  # warm-up batches excluded
            start, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        seen += len(y)
        if start is not None and seen >= n_images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def usual_loop_fresh(name: str, data_dir, n_images: int, device) -> float:
    """The usual loop in a new Python process (allocator and thread pool as a user's own script would have them)."""
    cmd = [sys.executable, __file__, "--usual-loop-only", name, "--images", str(n_images), "--device", str(device)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def engine(spec, mnist, n_images: int, device, compile_model: bool = False, cuda_graphs: bool = True,
           batch_size: int = TrainConfig.batch_size, precision: str = "auto", whole_step: bool | None = None,
           torch_dropout: bool = False, shards: int | None = None) -> tuple[float, float]:
    """Images per second of the second epoch, and the first epoch's extra seconds (compile time, warm-up)."""
    model = with_torch_dropout(build(spec)) if torch_dropout else build(spec)
    history = fit(model, mnist.train.head(n_images), mnist.val.head(1000),
                  TrainConfig(epochs=2, batch_size=batch_size), device=device, progress=False,
                  compile_model=compile_model, cuda_graphs=cuda_graphs, precision=precision, whole_step=whole_step,
                  shards=shards)
    first, last = history.epochs  # the second epoch: allocator, kernel choices and compiled graphs warmed up
    return last.images_per_s, first.seconds - last.seconds


def matmul_peak(device, n: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def measure_preset(name: str, args, mnist, device, bf16: bool, peak: float) -> None:
    """One preset's line: the usual loop against the engine, interleaved, and the variants asked for."""
    spec = PRESETS[name]
    macs = analyze(spec).macs
    loop, eng, eng32, eng_torch_drop, eng_unsharded = [], [], [], [], []
    sharded = device.type == "cpu" and cpu_shards(TrainConfig.batch_size, macs) > 1  # else already unsharded
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits all three alike
        # as many images as the engine: runs of 3,200 varied 30% (1,464 and 1,910 img/s for small)
        loop.append(usual_loop_fresh(name, args.data_dir, args.images, device))
        eng.append(engine(spec, mnist, args.images, device)[0])
        if bf16 and device.type == "cpu":
            eng32.append(engine(spec, mnist, args.images, device, precision="fp32")[0])
        if args.ablate:
            eng_torch_drop.append(engine(spec, mnist, args.images, device, torch_dropout=True)[0])
            if sharded:
                eng_unsharded.append(engine(spec, mnist, args.images, device, shards=1)[0])
    loop_ips, eng_ips = statistics.median(loop), statistics.median(eng)
    gflops = eng_ips * 6 * macs / 1e9
    line = (f"{name} ({analyze(spec).n_params:,} params, {macs / 1e6:.2f} M MACs/img): usual loop "
            f"{loop_ips:,.0f} img/s, engine {eng_ips:,.0f} img/s, ratio {eng_ips / loop_ips:.1f}x; engine "
            f"{gflops:.1f} GFLOP/s = {gflops / peak:.0%} of the {'bfloat16' if bf16 else 'float32'} matmul peak")
    if eng32:
        line += f"; engine in float32 {statistics.median(eng32):,.0f} img/s ({statistics.median(eng32) / loop_ips:.1f}x)"
    if eng_torch_drop:
        line += f"; engine with torch's nn.Dropout {statistics.median(eng_torch_drop):,.0f} img/s"
    if eng_unsharded:
        line += f"; engine unsharded {statistics.median(eng_unsharded):,.0f} img/s"
    elif args.ablate and device.type == "cpu":
        line += "; not sharded by default (search/engine/whole_step.py, cpu_shards)"
    if args.compile:
        comp = engine(spec, mnist, args.images, device, compile_model=True)
        gain = 1 / eng_ips - 1 / comp[0]  # seconds saved per image
        line += (f"; torch.compile {comp[0]:,.0f} img/s ({comp[0] / eng_ips:.2f}x), compile {comp[1]:.0f} s, "
                 f"pays off after {comp[1] / gain / 50_000 if gain > 0 else float('inf'):.1f} epochs of 50,000")
    print(line, flush=True)
    if device.type == "cuda":  # the engine as trials run it (CUDA graphs) against plain eager, per epoch
        eager = statistics.median(engine(spec, mnist, args.images, device, cuda_graphs=False, whole_step=False)[0]
                                  for _ in range(args.repeats))
        print(f"  {name} on {torch.cuda.get_device_name(device)}: CUDA graphs {50_000 / eng_ips:.2f} s per "
              f"50,000-image epoch ({eng_ips:,.0f} img/s), eager {50_000 / eager:.2f} s ({eager:,.0f} img/s), "
              f"graphs/eager {eng_ips / eager:.1f}x", flush=True)
        for batch in (128, 256):
            ips = engine(spec, mnist, args.images, device, batch_size=batch)[0]
            print(f"  {name} batch {batch}: CUDA graphs {50_000 / ips:.2f} s per epoch ({ips:,.0f} img/s)",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="baseline,small,compact")
    parser.add_argument("--images", type=int, default=12_800, help="training images per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    add_data_dir(parser)
    parser.add_argument("--compile", action="store_true", help="also measure the engine under torch.compile")
    parser.add_argument("--ablate", action="store_true",
                        help="also the engine with torch's nn.Dropout, and (on a CPU) unsharded (one batch on torch's "
                             "intra-op threads)")
    parser.add_argument("--usual-loop-only", metavar="PRESET", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    root = resolve_root(args.data_dir)
    if args.usual_loop_only:
        print(usual_loop(PRESETS[args.usual_loop_only], root, args.images, device))
        return
    mnist = load_or_exit(args.data_dir)
    bf16 = use_bf16(device)
    peak = matmul_peak(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    fp32_peak = matmul_peak(device) if bf16 else peak
    print(f"device {device}, {torch.get_num_threads()} threads; matmul peak float32 {fp32_peak:,.0f} GFLOP/s"
          + (f", bfloat16 {peak:,.0f} GFLOP/s (the engine autocasts to bfloat16 here)" if bf16 else ""))
    for name in args.presets.split(","):
        measure_preset(name, args, mnist, device, bf16, peak)


if __name__ == "__main__":
    main()
