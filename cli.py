"""budgetnas: architecture search for small convolutional networks under a hard parameter budget.

Thin: each command parses its options (declared in search/cli_options.py, from the bounds, defaults and choices of
search/option_table.py), calls one function of the package (search/commands.py, search/run.py), prints what it
returns and sets the exit code. Exit codes: 0 success, 1 refused (a network over the budget, a failed
certification), 2 unusable input, 130 and 143 a search, `best` or `certify` stopped by Ctrl-C and SIGTERM.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from models.rules import RULES
from search import cli_options as o
from search.option_table import (CERTIFY_SEEDS, HEARTBEAT, SEARCH, DeviceName, Objective, PrunerName,
                                 SamplerName, SizeMetric)
from search.refusals import CommandError

# Plain help (no rich markup): markup would swallow the "[default: ...]" parts of the option descriptions.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help=f"Search small conv nets under a parameter budget (MNIST, <{RULES.max_params:,} params, no Linear, "
                       f"<={RULES.max_epochs} epochs).")
console = Console(soft_wrap=True)  # log lines stay whole in files and CI logs
err = Console(stderr=True, soft_wrap=True)


def abort(message: str, code: int = 2, label: str | None = "error") -> NoReturn:
    """Print the message on stderr after its label ("error", "REFUSED", ...) and exit with `code`."""
    err.print(Text.assemble((f"{label}: ", "bold red"), message) if label else Text(message))  # it may hold [brackets]
    raise typer.Exit(code)


@contextmanager
def exits():
    """A CommandError raised within: its message printed, and its exit code."""
    try:
        yield
    except CommandError as exc:
        abort(str(exc), exc.code, exc.label)


def log(line: str) -> None:
    console.print(line, highlight=False, markup=False)


def warn(line: str) -> None:
    err.print(Text.assemble(("warning: ", "bold yellow"), line))


def percent(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / 100


@app.command(cls=o.PlainUsage)
def check(target: Annotated[str, typer.Argument(metavar="TARGET", help=(
              "A preset name, a spec JSON file, or path/to/file.py:ClassName. A module target is imported, and so "
              "RUN: check only files you would run anyway; an import that raises or exits is refused (exit 2)."))],
          max_params: o.MaxParams = RULES.max_params, max_macs: o.MaxMacs = None,
          max_activation_bytes: o.MaxActivationBytes = None, max_model_bytes: o.MaxModelBytes = None) -> None:
    """Count parameters, receptive field, MACs and int8 bytes per layer, and judge the network against the rules
    (and the microcontroller bounds given).

    `check path/to/file.py:ClassName` imports that file, running its code, and instantiates the class."""
    from search.commands import check_with_resources

    bounds = {"macs": max_macs, "activation-bytes": max_activation_bytes, "model-bytes": max_model_bytes}
    with exits():
        net, verdict, resources, over = check_with_resources(target, max_params, bounds)
    print_check(target, net, verdict, resources)
    if over:
        console.print("[bold red]REFUSED[/] by the microcontroller bounds")
        for reason in over:
            log(f"  - {reason}")
    if not verdict.ok or over:
        raise typer.Exit(1)


def print_check(target: str, net, verdict, resources=None) -> None:
    """The layer table (with int8 activation and weight bytes), the int8 totals, the receptive field (warning under
    the search's --min-rf), the head, and the verdict."""
    from models.spec import NetSpec
    from search.console import print_layer_table
    from search.data import SIDE

    print_layer_table(verdict.analysis, f"{target}", resources)
    if resources is not None:
        log(resources.summary())
        for note in resources.unmeasured:
            log(f"  not measured: {note}")
    min_rf = SEARCH["min_rf"]
    if verdict.receptive_field is not None:
        log(f"receptive field before global pooling: {verdict.receptive_field} pixels")
        if verdict.receptive_field < min_rf:  # a search heuristic, not a rule: said, not refused
            log(f"warning: a receptive field under {min_rf} px sees less than half the {SIDE}-px digit; the search "
                f"does not train such candidates (--min-rf {min_rf}), though the rules allow them")
    if isinstance(net, NetSpec) and net.head.kind == "gap_conv":
        log("head: global average pooling, then a 1x1 conv on the 1x1 map: allowed, not fully connected (it computes "
            "the same function as the 1x1 conv followed by the pooling)")
    if verdict.ok:
        console.print(Text(verdict.summary(), style="bold green"))
        return
    console.print("[bold red]REFUSED[/]")
    for reason in verdict.reasons:
        log(f"  - {reason}")


@app.command(cls=o.PlainUsage)
def show(preset: Annotated[str, typer.Argument(metavar="PRESET", help="A preset name.")],
         as_json: o.AsJson = False) -> None:
    """Print a preset's spec (JSON with --json) so it can be edited."""
    from models import presets
    from models.budget import analyze
    from search.console import print_layer_table

    if preset not in presets.PRESETS:
        abort(f"unknown preset {preset!r}; known: {', '.join(presets.PRESETS)}")
    spec = presets.PRESETS[preset]
    if as_json:
        print(spec.to_json())
    else:
        print_layer_table(analyze(spec), preset)


@app.command()
def search(  # long: one line per option
    trials: o.Trials = SEARCH["trials"], study: o.Study = SEARCH["study"], storage: o.Storage = None,
    epochs: o.Epochs = SEARCH["epochs"], max_params: o.MaxParams = SEARCH["max_params"],
    max_macs: o.MaxMacs = None, max_activation_bytes: o.MaxActivationBytes = None,
    max_model_bytes: o.MaxModelBytes = None, size_metric: o.SizeMetricOpt = SizeMetric(SEARCH["size_metric"]),
    objective: o.ObjectiveOpt = Objective(SEARCH["objective"]), sampler: o.Sampler = SamplerName(SEARCH["sampler"]),
    pruner: o.Pruner = PrunerName(SEARCH["pruner"]), seed: o.Seed = SEARCH["seed"],
    device: o.Device = DeviceName(SEARCH["device"]), jobs: o.Jobs = SEARCH["jobs"], subset: o.Subset = None,
    data_dir: o.DataDir = None, dataset: o.Dataset = SEARCH["dataset"], target: o.Target = None,
    floor: o.SearchFloor = None, descend: o.Descend = SEARCH["descend"], winner_bound: o.WinnerBound = None,
    winner_descent: o.WinnerDescent = None, warm_start: o.WarmStart = SEARCH["warm_start"],
    repair: o.Repair = SEARCH["repair"], max_rejections: o.MaxRejections = SEARCH["max_rejections"],
    min_rf: o.MinRf = SEARCH["min_rf"], results_dir: o.SearchResultsDir = SEARCH["results_dir"],
    threads: o.Threads = None, heartbeat: o.Heartbeat = HEARTBEAT, worker_id: o.WorkerId = None,
) -> None:
    """Search the block-builder's space with Optuna; every trial is stored, and the same command resumes."""
    from search.console import print_leaderboard, print_trial_line
    from search.run import search_command, search_options, unfinished

    with exits():  # bad input refused before anything is written; Ctrl-C and SIGTERM: exit 130 and 143
        opts = search_options(heartbeat, worker_id, trials=trials, study=study, storage=storage, results_dir=results_dir,
                              epochs=epochs, max_params=max_params, max_macs=max_macs,
                              max_activation_bytes=max_activation_bytes, max_model_bytes=max_model_bytes,
                              size_metric=size_metric.value, objective=objective.value, sampler=sampler.value,
                              pruner=pruner.value, seed=seed, device=device.value, jobs=jobs, subset=subset,
                              data_dir=data_dir, dataset=dataset, target=percent(target), floor=percent(floor),
                              descend=descend, winner_bound=winner_bound,
                              winner_descent=winner_descent, warm_start=warm_start, repair=repair,
                              max_rejections=max_rejections, min_rf=min_rf, threads=threads)
        result = search_command(opts, log=log, on_trial_end=lambda study_obj, trial: print_trial_line(study_obj, trial,
                                                                                                      opts))
    print_leaderboard(result, opts)
    why = unfinished(result)
    if why:
        abort(why, 1)


def certifying(seeds: int, data_dir: Optional[str], device: DeviceName, results_dir: str, max_params: int):
    """Where and how best and certify train, printing as they go."""
    from search.commands import Certifying
    from search.console import print_verdict

    return Certifying(seeds, data_dir, device.value, results_dir, max_params, log=log, warn=warn, show=print_verdict)


@app.command()
def best(
    study: o.Study = SEARCH["study"], storage: o.Storage = None, trial: o.BestTrial = None,
    target: o.BestTarget = None, front: o.Front = False, floor: o.Floor = None, seeds: o.Seeds = CERTIFY_SEEDS,
    epochs: o.BestEpochs = None, max_params: o.CertifyMaxParams = RULES.max_params,
    device: o.Device = DeviceName(SEARCH["device"]), data_dir: o.DataDir = None,
    results_dir: o.ResultsDir = SEARCH["results_dir"],
) -> None:
    """Retrain the winner on all 60,000 training images with several seeds and certify it on the test set."""
    from search.commands import best_command
    from search.console import print_front
    from search.retrain import certificate_dir

    how = certifying(seeds, data_dir, device, results_dir, max_params)
    with exits():  # Ctrl-C and SIGTERM: exit 130 and 143, one line saying what is kept (search/commands.py)
        choice, certs, summary = best_command(study, storage, how, trial=trial, target=percent(target), front=front,
                                              floor=percent(floor), epochs=epochs)
    if summary is not None:
        print_front(summary)
        log(f"written: {Path(results_dir) / study / 'front.json'} and one certificate per trial under "
            f"{certificate_dir(results_dir, '').resolve()}")
        return
    log(f"written: {certificate_dir(results_dir, choice.chosen[0].name) / 'certificate.json'} (and "
        f"{Path(results_dir) / study / 'best.json'}) and one checkpoint per seed")
    if not certs[0][0]["certified"]:
        raise typer.Exit(1)


@app.command()
def certify(
    target: Annotated[Optional[str], typer.Argument(metavar="TARGET", help="A preset name, a spec JSON file, or "
                                                    "path/to/file.py:ClassName (or --study S --trial N for a stored "
                                                    "trial).")] = None,
    study: o.TrialStudy = None, trial: o.Trial = None, storage: o.Storage = None, name: o.Name = None,
    seeds: o.Seeds = CERTIFY_SEEDS, epochs: o.CertifyEpochs = None, optimizer: o.Optimizer = None, lr: o.Lr = None,
    batch_size: o.BatchSize = None, schedule: o.Schedule = None, augment: o.Augment = None,
    label_smoothing: o.LabelSmoothing = None, max_params: o.CertifyMaxParams = RULES.max_params,
    dataset: o.CertifyDataset = None, target_accuracy: o.Target = None,
    device: o.Device = DeviceName(SEARCH["device"]), data_dir: o.DataDir = None,
    results_dir: o.CertifyResultsDir = SEARCH["results_dir"],
) -> None:
    """Train and certify any network against the four rules: a preset, a spec JSON, your own nn.Module class, or a
    stored trial. Exits 1 before training if a rule already fails."""
    from search.commands import certify_command
    from search.retrain import certificate_dir

    how = certifying(seeds, data_dir, device, results_dir, max_params)
    with exits():  # Ctrl-C and SIGTERM: exit 130 and 143, one line saying what is kept (search/commands.py)
        c, cert = certify_command(target, how, study=study, trial=trial, storage=storage, name=name, dataset=dataset,
                                  target_accuracy=percent(target_accuracy), epochs=epochs,
                                  optimizer=optimizer and optimizer.value, lr=lr, batch_size=batch_size,
                                  schedule=schedule and schedule.value, augment=augment, label_smoothing=label_smoothing)
    log(f"written: {certificate_dir(results_dir, c.name) / 'certificate.json'} and one checkpoint per seed")
    if not cert["certified"]:
        raise typer.Exit(1)


@app.command()
def export(certificate: o.Certificate = None, seed: o.ExportSeed = None, module: o.Module = None, out: o.Out = None,
           data_dir: o.DataDir = None, results_dir: o.ExportResultsDir = SEARCH["results_dir"],
           int8: o.Int8 = False) -> None:
    """ONNX and torch.export (.pt2) files of a certified network, BatchNorm folded into the convs, each checked on
    the 10,000 test images against the checkpoint; and a model card, MODEL.md. The certificate is verified first
    against its checkpoints (digests, spec, config, the rules judged again, every seed's test accuracy measured
    again): a disagreement is exit 1 naming the field, with nothing written. --int8 adds model.int8.onnx."""
    from search.commands import export_command

    with exits():
        path, result = export_command(certificate, seed, module, out, data_dir, results_dir, log, int8)
    if result.failed_rules:
        warn(f"{path.parent.name} fails {'; '.join(result.failed_rules)} (judged again from its checkpoints); "
             "exported anyway, and its card says so")
    acc = result.accuracy
    log(f"test accuracy: checkpoint {acc['checkpoint']:.2%}, BatchNorm folded {acc['folded']:.2%}, ONNX "
        f"{acc['onnx']:.2%}, torch.export {acc['pt2']:.2%}" + (f", int8 {acc['int8']:.2%}" if "int8" in acc else "")
        + f" (seed {result.seed})")
    if result.int8 and result.int8["warning"]:
        warn(result.int8["warning"])
    files = [result.onnx, result.program] + ([result.int8_path] if result.int8_path else []) + [result.card]
    log(f"written: {', '.join(map(str, files))}; {result.n_params:,} parameters, {result.n_params_folded:,} with "
        "BatchNorm folded")


@app.command()
def report(study: o.Study = SEARCH["study"], storage: o.Storage = None,
           results_dir: o.ResultsDir = SEARCH["results_dir"], open_browser: o.OpenBrowser = False) -> None:
    """Write results/<study>/report.html: one offline page with the study's figures and tables."""
    from search.commands import report_command

    with exits():
        path, counts = report_command(study, storage, results_dir, warn)
    log(f"report: {path} ({counts})")
    if open_browser:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            err.print("no browser found here; open the file above by hand")


@app.command()
def data(data_dir: o.DataDir = None, dataset: o.Dataset = SEARCH["dataset"]) -> None:
    """Check a set's files under the data root (header, counts, shape, size, every md5 computed now) and print the split
    sizes."""
    from search.commands import data_command

    with exits():
        log(data_command(data_dir, dataset))


if __name__ == "__main__":
    app()
