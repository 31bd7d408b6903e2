"""budgetnas: architecture search for small convolutional networks under a hard parameter budget.

Thin: each command parses its options and calls one function of the package.
Exit codes: 0 success, 1 refused (a network over the budget, a failed certification), 2 unusable input.
"""

from __future__ import annotations

import importlib.util
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from models.rules import RULES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=f"Search small conv nets under a parameter budget (MNIST, <{RULES.max_params:,} params, no Linear, "
                       f"<={RULES.max_epochs} epochs).")
console = Console(soft_wrap=True)  # log lines stay whole in files and CI logs
err = Console(stderr=True, soft_wrap=True)


def bounded(lo: int, hi: int | None = None, note: str = ""):
    """A typer callback that refuses a number outside [lo, hi], naming the value and the limit."""
    def check_value(value):
        if value is not None and (value < lo or (hi is not None and value > hi)):
            limit = f"must be from {lo:,} to {hi:,}" if hi is not None else f"must be at least {lo:,}"
            raise typer.BadParameter(f"{value} {limit}{note}")
        return value
    return check_value


MaxParams = Annotated[int, typer.Option("--max-params", callback=bounded(1),
                                        help="Budget: networks must have fewer parameters.")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding MNIST/raw/*-ubyte "
                                                "[default: $BUDGETNAS_DATA, else ./data].")]
CertifyMaxParams = Annotated[int, typer.Option("--max-params", callback=bounded(1), help=(
    f"A budget judged beside the exercise's four rules (which always include fewer than {RULES.max_params:,})."))]
Study = Annotated[str, typer.Option("--study", help="Study name.")]
Storage = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL "
                                                "[default: sqlite:///results/<study>.db].")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(Text.assemble(("error: ", "bold red"), message))  # plain text: a message may hold [brackets]
    return typer.Exit(code)


def _load_target(target: str):
    """A preset name, a spec JSON file, or path/to/file.py:ClassName -> NetSpec or nn.Module."""
    from models import presets
    from models.spec import NetSpec, SpecError

    if target in presets.PRESETS:
        return presets.PRESETS[target]
    if ":" in target and target.split(":", 1)[0].endswith(".py"):
        path, _, class_name = target.partition(":")
        if not Path(path).is_file():
            raise fail(f"{path}: no such file")
        try:
            module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            cls = getattr(module, class_name)
        except AttributeError:
            raise fail(f"{path} defines no {class_name!r}") from None
        except Exception as exc:
            raise fail(f"{path} could not be imported: {type(exc).__name__}: {exc}") from None
        import torch

        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise fail(f"{target}: {class_name} is a {type(cls).__name__}, not a torch.nn.Module class")
        try:
            return cls()
        except Exception as exc:
            raise fail(f"{target}() could not be instantiated without arguments: {type(exc).__name__}: {exc}") from None
    path = Path(target)
    if not path.is_file():
        raise fail(f"{target!r} is neither a preset ({', '.join(presets.PRESETS)}), a spec JSON file, "
                   "nor path/to/file.py:ClassName")
    if path.suffix == ".py":
        raise fail(f"{target}: a Python file needs the class to check after a colon, {target}:ClassName")
    try:
        return NetSpec.from_json(path.read_text())
    except SpecError as exc:
        if "the map must stay at least 1x1" in str(exc):  # a network that exists on paper, refused by the rules
            err.print(Text.assemble(("REFUSED: ", "bold red"), f"{path}: {exc}"))
            raise typer.Exit(1) from None
        raise fail(f"{path}: {exc}") from None


@app.command()
def check(target: Annotated[str, typer.Argument(help="A preset name, a spec JSON file, or path/to/file.py:ClassName.")],
          max_params: MaxParams = RULES.max_params) -> None:
    """Count parameters, receptive field and MACs per layer, and judge the network against the rules."""
    from models.budget import check as check_spec, check_module
    from models.build import build
    from models.spec import NetSpec
    from search.console import print_layer_table
    from search.data import MNIST_CLASSES
    from search.options import MIN_RF

    net = _load_target(target)
    if isinstance(net, NetSpec):
        verdict = check_spec(net, max_params)
        module_verdict = check_module(build(net), max_params=max_params, num_classes=MNIST_CLASSES)
        if module_verdict.ok != verdict.ok or module_verdict.n_params != verdict.n_params:  # defence in depth
            verdict = module_verdict
    else:
        verdict = check_module(net, max_params=max_params, num_classes=MNIST_CLASSES)
    print_layer_table(verdict.analysis, f"{target}")
    if verdict.receptive_field is not None:
        console.print(f"receptive field before global pooling: {verdict.receptive_field} pixels")
        if verdict.receptive_field < MIN_RF:  # a search heuristic, not a rule: said, not refused
            console.print(f"warning: a receptive field under {MIN_RF} px sees less than half the 28-px digit; the "
                          f"search does not train such candidates (--min-rf {MIN_RF}), though the rules allow them",
                          highlight=False)
    if isinstance(net, NetSpec) and net.head.kind == "gap_conv":
        console.print("head: global average pooling, then a 1x1 conv on the 1x1 map: allowed, not fully connected "
                      "(it computes the same function as the 1x1 conv followed by the pooling)", highlight=False)
    if verdict.ok:
        console.print(Text(verdict.summary(), style="bold green"))
        return
    console.print("[bold red]REFUSED[/]")
    for reason in verdict.reasons:
        console.print(f"  - {reason}", highlight=False, markup=False)
    raise typer.Exit(1)


@app.command()
def show(preset: Annotated[str, typer.Argument(help="A preset name.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the spec as JSON, to edit and pass to check.")] = False
         ) -> None:
    """Print a preset's spec (JSON with --json) so it can be edited."""
    from models import presets
    from models.budget import analyze
    from search.console import print_layer_table

    if preset not in presets.PRESETS:
        raise fail(f"unknown preset {preset!r}; known: {', '.join(presets.PRESETS)}")
    spec = presets.PRESETS[preset]
    if as_json:
        print(spec.to_json())
    else:
        print_layer_table(analyze(spec), preset)


class Objective(str, Enum):
    accuracy = "accuracy"
    pareto = "pareto"


class SamplerName(str, Enum):
    tpe = "tpe"
    random = "random"
    nsga2 = "nsga2"


class PrunerName(str, Enum):
    sha = "sha"
    hyperband = "hyperband"
    median = "median"
    none = "none"


class DeviceName(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly stop as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Interrupted()


@app.command()
def search(  # long: one line per option, and the refusals of bad input before anything is written
    trials: Annotated[int, typer.Option(callback=bounded(1), help="Trained trials in the study (rejected candidates do not count).")] = 50,
    study: Study = "mnist",
    storage: Storage = None,
    epochs: Annotated[int, typer.Option(callback=bounded(1, RULES.max_epochs,
                                                         f" (the exercise allows at most {RULES.max_epochs} epochs)"),
                                        help=f"Epochs per trial (the rules allow at most {RULES.max_epochs}).")] = RULES.max_epochs,
    max_params: MaxParams = RULES.max_params,
    objective: Annotated[Objective, typer.Option(help="accuracy: maximise validation accuracy; pareto: also "
                                                 "minimise parameters.")] = Objective.accuracy,
    sampler: Annotated[SamplerName, typer.Option()] = SamplerName.tpe,
    pruner: Annotated[PrunerName, typer.Option(help="Stops weak trials early: sha = successive halving at epochs 1, 3, 9 (default; also for pareto), hyperband, median or none.")] = PrunerName.sha,
    seed: Annotated[int, typer.Option(help="Sampler and training seed.")] = 0,
    device: Annotated[DeviceName, typer.Option()] = DeviceName.auto,
    jobs: Annotated[int, typer.Option(callback=bounded(1), help="Trials in parallel in this process (helps on a GPU).")] = 1,
    subset: Annotated[Optional[int], typer.Option(callback=bounded(100, 50_000, " training images"), help="Train on the first N training "
                                                  "images (quick tries).")] = None,
    data_dir: DataDir = None,
    warm_start: Annotated[bool, typer.Option(help="Enqueue the presets as the first trials.")] = True,
    repair: Annotated[bool, typer.Option(help="Shrink over-budget candidates until they fit, instead of "
                                         "rejecting them.")] = False,
    max_rejections: Annotated[int, typer.Option(callback=bounded(1), help="Stop after this many untrained candidates in a row.")] = 200,
    min_rf: Annotated[int, typer.Option(callback=bounded(1, 28), help="Reject, untrained, candidates whose receptive field is smaller (pixels).")] = 12,
    results_dir: Annotated[str, typer.Option(help="Where the database, trials.csv and reports go.")] = "results",
    threads: Annotated[Optional[int], typer.Option(callback=bounded(1), help="CPU threads for this worker [default: cores / "
                                                   "jobs]; with W workers on one machine, give cores / W.")] = None,
    heartbeat: Annotated[str, typer.Option(hidden=True, help="Tests: heartbeat interval and grace, seconds.")] = "10,60",
    worker_id: Annotated[Optional[str], typer.Option(hidden=True, help="Tests: play a worker on another host.")] = None,
) -> None:
    """Search the block-builder's space with Optuna; every trial is stored, and the same command resumes."""
    import signal

    from search.data import DataError, check_data_root, load_mnist
    from search.engine import resolve_device
    from search.storage import SearchError, check_results_folder, this_worker
    from search.console import print_leaderboard, print_trial_line
    from search.options import SearchOptions
    from search.record import nothing_trained_well
    from search.study import run_search

    try:
        beat = tuple(int(x) for x in heartbeat.split(","))
        opts = SearchOptions(trials=trials, study=study, storage=storage, results_dir=results_dir, epochs=epochs,
                             max_params=max_params, objective=objective.value, sampler=sampler.value,
                             pruner=pruner.value, seed=seed, device=device.value, jobs=jobs, subset=subset,
                             data_dir=data_dir, warm_start=warm_start, repair=repair, max_rejections=max_rejections, min_rf=min_rf,
                             threads=threads, heartbeat=beat, worker=worker_id or this_worker())
        resolve_device(opts.device)
        check_data_root(data_dir)
        _refuse_sqlite_across_threads(opts)
        check_results_folder(opts.results_dir, opts.study, opts.storage_url)  # writable, and not another storage's
        load_mnist(data_dir)  # absent files: the download is tried, and refused here, before anything is written
    except (SearchError, DataError, ValueError) as exc:
        raise fail(str(exc)) from None

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = run_search(opts, log=lambda line: console.print(line, highlight=False, markup=False),
                            on_trial_end=lambda study_obj, trial: print_trial_line(study_obj, trial, opts))
    except (SearchError, DataError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt as exc:
        from search.storage import load_existing_study, requeue_interrupted

        n = requeue_interrupted(load_existing_study(opts.study, opts.storage_url))
        sig = "SIGTERM" if isinstance(exc, Interrupted) else "Ctrl-C"
        err.print(f"{sig}: search stopped; the running trial is stored as interrupted"
                  f"{' and queued again' if n else ''}. Run the same command to continue to {trials} trials.")
        raise typer.Exit(143 if isinstance(exc, Interrupted) else 130) from None
    print_leaderboard(result, opts)
    if result.stop_reason:
        raise fail(result.stop_reason, code=1)
    failed_all = nothing_trained_well(result.study)
    if failed_all:
        raise fail(failed_all, code=1)


def _refuse_sqlite_across_threads(opts) -> None:
    from search.storage import SearchError

    if opts.jobs > 1 and opts.storage_url.startswith("sqlite"):
        raise SearchError(f"--jobs={opts.jobs} with SQLite storage: SQLite serialises every write and parallel "
                          "trials would wait on its lock; use a server database (--storage postgresql://...) "
                          "for parallel trials, or --jobs 1")


def _open_study(study: str, storage: Optional[str], results_dir: str):
    """The stored study, and its results folder checked writable and owned by its storage (best and report write
    there)."""
    from search.fsio import UnwritablePath
    from search.storage import (SearchError, check_results_folder, check_study_name, claim_results_folder,
                                load_existing_study, sqlite_file, storage_url)

    try:
        url = storage_url(storage, results_dir, check_study_name(study))
        db = sqlite_file(url)
        if db is not None and not db.exists():
            raise SearchError(f"no study {study!r}: {db} does not exist (run search first, or give --storage / "
                              "--results-dir)")
        check_results_folder(results_dir, study, url)
        study_obj = load_existing_study(study, url)
        claim_results_folder(results_dir, study, url)
    except (SearchError, UnwritablePath) as exc:
        raise fail(str(exc)) from None
    return study_obj


@app.command()
def best(
    study: Study = "mnist",
    storage: Storage = None,
    trial: Annotated[Optional[int], typer.Option("--trial", callback=bounded(0), help="Certify this trial instead of the winner.")] = None,
    target: Annotated[Optional[float], typer.Option(callback=bounded(0, 100, " percent"), help="Pareto studies: certify the smallest "
                                                   "network whose validation accuracy reached this percentage.")] = None,
    front: Annotated[bool, typer.Option("--front", help="Certify every trial on the accuracy/size front at or above "
                                        "--floor, smallest first; writes front.json.")] = False,
    floor: Annotated[float, typer.Option(callback=bounded(0, 100, " percent"), help="With --front: the lowest "
                                         "validation accuracy certified, percent.")] = 99.0,
    seeds: Annotated[int, typer.Option(callback=bounded(1, 10), help="Retraining seeds.")] = 3,
    max_params: CertifyMaxParams = RULES.max_params,
    device: Annotated[DeviceName, typer.Option()] = DeviceName.auto,
    data_dir: DataDir = None,
    results_dir: Annotated[str, typer.Option(help="Where the study's files are.")] = "results",
) -> None:
    """Retrain the winner on all 60,000 training images with several seeds and certify it on the test set."""
    from search.data import DataError, check_data_root
    from search.engine import resolve_device
    from search.console import print_front, print_verdict
    from search.retrain import (certificate_dir, certify, front_summary, front_to_certify, pick_winner,
                                reusable_certificate, write_best)
    from search.storage import SearchError

    if front and (trial is not None or target is not None):
        raise fail("--front certifies the whole front; it takes neither --trial nor --target")
    try:
        resolve_device(device.value)
        check_data_root(data_dir)
    except (DataError, ValueError) as exc:
        raise fail(str(exc)) from None
    study_obj = _open_study(study, storage, results_dir)
    try:
        chosen = front_to_certify(study_obj, floor / 100) if front else [
            pick_winner(study_obj, trial, None if target is None else target / 100)]
    except SearchError as exc:
        raise fail(str(exc)) from None
    if front:
        console.print(f"certifying the front at or above {floor:.2f}% validation: trials "
                      + ", ".join(f"{r.number} ({r.n_params:,} params, {r.values[0]:.2%})" for r in chosen),
                      highlight=False)
    log = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
    certs: list[tuple[dict, bool]] = []
    for record in chosen:
        val = f", validation {record.values[0]:.2%}" if record.values else ""
        reused = reusable_certificate(results_dir, study, record, seeds, RULES.target_accuracy, max_params) \
            if front else None
        if reused:
            console.print(f"trial {record.number}: certified before with the same network, recipe and seeds; "
                          "its certificate is reused", highlight=False)
            certs.append((reused, True))
            continue
        console.print(f"certifying trial {record.number}: {record.n_params:,} params{val}", highlight=False)
        try:
            result = certify(study_obj, record, seeds=seeds, data_dir=data_dir, device=device.value,
                             results_dir=results_dir, max_params=max_params, log=log)
        except DataError as exc:
            raise fail(str(exc)) from None
        print_verdict(result, seeds)
        certs.append((result, False))
        if front:  # written after each trial: an interrupted --front keeps what it certified
            front_summary(study, floor / 100, seeds, certs, results_dir)
    written = certificate_dir(results_dir, study, chosen[-1].number)
    if front:
        summary = front_summary(study, floor / 100, seeds, certs, results_dir)
        print_front(summary)
        console.print(f"written: {Path(results_dir) / study / 'front.json'} and one certificate per trial under "
                      f"{written.parent}", highlight=False)
        return
    write_best(results_dir, certs[0][0])
    console.print(f"written: {written / 'certificate.json'} (and {Path(results_dir) / study / 'best.json'}) and one "
                  "checkpoint per seed", highlight=False)
    if not certs[0][0]["certified"]:
        raise typer.Exit(1)


@app.command()
def report(
    study: Study = "mnist",
    storage: Storage = None,
    results_dir: Annotated[str, typer.Option(help="Where the study's files are.")] = "results",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the report in a browser.")] = False,
) -> None:
    """Write results/<study>/report.html: one offline page with the study's figures and tables."""
    from search.report import write_report
    from search.retrain import read_best, read_front

    study_obj = _open_study(study, storage, results_dir)
    path = write_report(study_obj, results_dir, read_best(results_dir, study), read_front(results_dir, study))
    console.print(f"report: {path} ({len(study_obj.get_trials(deepcopy=False))} trials)", highlight=False)
    if open_browser:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            err.print("no browser found here; open the file above by hand")


@app.command()
def data(data_dir: DataDir = None) -> None:
    """Check the MNIST files under the data root (header, count, size, md5) and print the split sizes."""
    from search.data import DataError, check_data_root, load_mnist

    try:
        check_data_root(data_dir)
        mnist = load_mnist(data_dir, with_test=True)
    except DataError as exc:
        raise fail(str(exc)) from None
    console.print(f"MNIST under {mnist.root}: {len(mnist.train):,} train, {len(mnist.val):,} validation "
                  f"(held out from the training set), {len(mnist.test):,} test images; all four files check out")


if __name__ == "__main__":
    app()
