"""budgetnas: architecture search for small convolutional networks under a hard parameter budget.

Thin: each command parses its options and calls one function of the package.
Exit codes: 0 success, 1 refused (a network over the budget, a failed certification), 2 unusable input.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from models.rules import RULES

# Plain help (no rich markup): markup would swallow the "[default: ...]" parts of the option descriptions.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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
DATASET_HELP = ("mnist, fashion-mnist, kmnist, or idx (four IDX files of 28x28 grey images and integer labels "
                "under --data-dir)")
Dataset = Annotated[str, typer.Option("--dataset", help=f"The image set: {DATASET_HELP}.")]
Target = Annotated[Optional[float], typer.Option("--target", callback=bounded(0, 100, " percent"), help=(
    "Target accuracy, percent [default: 99.4 for MNIST; none for other sets, whose reports then draw no target "
    "line and whose certificates do not judge accuracy]."))]
Storage = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL "
                                                "[default: sqlite:///results/<study>.db].")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(Text.assemble(("error: ", "bold red"), message))  # plain text: a message may hold [brackets]
    return typer.Exit(code)


def _load_target(target: str):
    """A preset name, a spec JSON file, or path/to/file.py:ClassName -> NetSpec or nn.Module; exit 2 (unusable) or,
    for a spec whose maps shrink below 1x1, exit 1 (a network the rules refuse)."""
    from models.load import RefusedSpec, TargetError, load_target

    try:
        return load_target(target)
    except RefusedSpec as exc:
        err.print(Text.assemble(("REFUSED: ", "bold red"), str(exc)))
        raise typer.Exit(1) from None
    except TargetError as exc:
        raise fail(str(exc)) from None


@app.command()
def check(target: Annotated[str, typer.Argument(help=(
              "A preset name, a spec JSON file, or path/to/file.py:ClassName. A module target is imported, and so "
              "RUN: check only files you would run anyway; an import that raises or exits is refused (exit 2)."))],
          max_params: MaxParams = RULES.max_params) -> None:
    """Count parameters, receptive field and MACs per layer, and judge the network against the rules.

    `check path/to/file.py:ClassName` imports that file, running its code, and instantiates the class."""
    from models.budget import check as check_spec, check_module
    from models.build import build
    from models.spec import MAX_BUILT_PARAMS, NetSpec
    from search.console import print_layer_table
    from search.data import MNIST_CLASSES
    from search.options import MIN_RF

    net = _load_target(target)
    if isinstance(net, NetSpec):
        verdict = check_spec(net, max_params)
        if verdict.n_params <= MAX_BUILT_PARAMS:  # a larger spec is judged on its count alone, never allocated
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


Device = Annotated[DeviceName, typer.Option(help="Where to train: auto (CUDA if present, else the CPU), cpu or cuda.")]


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
    sampler: Annotated[SamplerName, typer.Option(help="Optuna sampler: tpe (multivariate TPE), random, or nsga2.")] = SamplerName.tpe,
    pruner: Annotated[PrunerName, typer.Option(help="Stops weak trials early: sha = successive halving at epochs 1, 3, 9 (default; also for pareto), hyperband, median or none.")] = PrunerName.sha,
    seed: Annotated[int, typer.Option(help="Sampler and training seed.")] = 0,
    device: Device = DeviceName.auto,
    jobs: Annotated[int, typer.Option(callback=bounded(1), help="Trials in parallel in this process (helps on a GPU).")] = 1,
    subset: Annotated[Optional[int], typer.Option(callback=bounded(100, 50_000, " training images"), help="Train on the first N training "
                                                  "images (quick tries) [default: all 50,000].")] = None,
    data_dir: DataDir = None,
    dataset: Dataset = "mnist",
    target: Target = None,
    floor: Annotated[Optional[float], typer.Option(callback=bounded(0, 100, " percent"), help=(
        "Pareto: a trial that cannot reach this validation accuracy (percent) stops from epoch 3, judged by the "
        "largest gain the study's trials at the floor made after that epoch [default: the target minus 0.4; none "
        "without a target]."))] = None,
    descend: Annotated[bool, typer.Option(help="Pareto: queue shrunk copies (0.8, then 0.9 of the parameters) of the "
                                          "smallest trial at the target and at the floor, every other trial.")] = True,
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
    from search.engine.runtime import stop_at_safe_points
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
                             data_dir=data_dir, dataset=dataset, target=None if target is None else target / 100,
                             floor=None if floor is None else floor / 100, descend=descend,
                             warm_start=warm_start, repair=repair, max_rejections=max_rejections, min_rf=min_rf,
                             threads=threads, heartbeat=beat, worker=worker_id or this_worker())
        resolve_device(opts.device)
        check_data_root(data_dir, dataset)
        _refuse_sqlite_across_threads(opts)
        check_results_folder(opts.results_dir, opts.study, opts.storage_url)  # writable, and not another storage's
        load_mnist(data_dir, dataset=dataset)  # absent files: the download is tried, and refused here, before anything
        # is written
    except (SearchError, DataError, ValueError) as exc:
        raise fail(str(exc)) from None

    try:
        with stop_at_safe_points():  # Ctrl-C and SIGTERM stop training between two steps, or between trials
            result = run_search(opts, log=lambda line: console.print(line, highlight=False, markup=False),
                                on_trial_end=lambda study_obj, trial: print_trial_line(study_obj, trial, opts))
    except (SearchError, DataError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt as exc:
        # The clean-up below runs once: a second signal now would interrupt it half-way.
        before = signal.signal(signal.SIGTERM, signal.SIG_IGN), signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = _stop_cleanly(opts, getattr(exc, "signal_name", "SIGINT") == "SIGTERM")
        finally:
            signal.signal(signal.SIGTERM, before[0])
            signal.signal(signal.SIGINT, before[1])
        raise typer.Exit(code) from None
    print_leaderboard(result, opts)
    if result.stop_reason:
        raise fail(result.stop_reason, code=1)
    failed_all = nothing_trained_well(result.study)
    if failed_all:
        raise fail(failed_all, code=1)


def _stop_cleanly(opts, sigterm: bool) -> int:
    """After Ctrl-C or SIGTERM: queue the interrupted trial again, rewrite trials.csv, say so in one line; the exit
    code (130 or 143). A signal before the study existed leaves nothing to tidy."""
    from search.storage import SearchError, load_existing_study, requeue_interrupted
    from search.study import trials_csv_path, write_trials_csv

    n = 0
    try:
        study = load_existing_study(opts.study, opts.storage_url)
        n = requeue_interrupted(study)
        write_trials_csv(study, trials_csv_path(opts.results_dir, opts.study))
    except SearchError:  # interrupted before the study was created
        pass
    sig = "SIGTERM" if sigterm else "Ctrl-C"
    err.print(f"{sig}: search stopped; the running trial is stored as interrupted{' and queued again' if n else ''}. "
              f"Run the same command to continue to {opts.trials} trials.")
    return 143 if sigterm else 130


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


Seeds = Annotated[int, typer.Option(callback=bounded(1, 10), help="Retraining seeds (0, 1, ...).")]
CertifyEpochs = Annotated[Optional[int], typer.Option(
    "--epochs", callback=bounded(1, 1000),
    help=f"Epochs to retrain, at most {RULES.max_epochs} to pass [default: the trial's; {RULES.max_epochs} for other targets].")]


def _refuse_epochs(epochs: Optional[int]) -> None:
    """More epochs than the rules allow: a refusal (exit 1) before any training, like a network over the budget."""
    if epochs is not None and epochs > RULES.max_epochs:
        err.print(Text.assemble(("REFUSED before training: ", "bold red"),
                                f"--epochs {epochs}: the rules allow {RULES.epochs_rule()}"))
        raise typer.Exit(1)


def _certify_all(chosen, *, seeds, data_dir, device, results_dir, max_params, target, reuse=False,
                 after_each=None) -> list[tuple[dict, bool]]:
    """Certify each network (refusing, before any training, one that a rule already fails); [(certificate, reused)].
    `after_each(certs so far)` runs after each certification."""
    from search.console import print_verdict
    from search.data import DataError
    from search.retrain import certify, refusal_before_training, reusable_certificate

    for c in chosen:
        refusal = refusal_before_training(c, max_params)
        if refusal:
            err.print(Text.assemble(("REFUSED before training: ", "bold red"), f"{c.label()}: {refusal}"))
            raise typer.Exit(1)
    log = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
    certs: list[tuple[dict, bool]] = []
    for c in chosen:
        reused, why_not = (reusable_certificate(results_dir, c, seeds, target, max_params, data_dir) if reuse
                           else (None, None))
        if why_not:
            err.print(Text.assemble(("warning: ", "bold yellow"), f"{c.label()}: its certificate is not reused, its "
                                    f"evidence does not bear it out: {why_not}; certifying again"))
        if reused:
            console.print(f"{c.label()}: certified before with the same network, recipe and seeds, and its "
                          "checkpoints bear it out (digests, the rules judged again, the test accuracy measured "
                          "again); its certificate is reused", highlight=False)
            certs.append((reused, True))
            continue
        val = f", validation {c.val_acc:.2%}" if c.val_acc is not None else ""
        console.print(f"certifying {c.label()}{val}", highlight=False)
        try:
            result = certify(c, seeds=seeds, data_dir=data_dir, device=device, results_dir=results_dir,
                             max_params=max_params, target=target, log=log)
        except DataError as exc:
            raise fail(str(exc)) from None
        print_verdict(result, seeds)
        certs.append((result, False))
        if after_each:
            after_each(certs)
    return certs


def _check_run_inputs(device: "DeviceName", data_dir: Optional[str], dataset: str = "mnist") -> None:
    from search.data import DataError, check_data_root
    from search.engine import resolve_device

    try:
        resolve_device(device.value)
        check_data_root(data_dir, dataset)
    except (DataError, ValueError) as exc:
        raise fail(str(exc)) from None


@app.command()
def best(
    study: Study = "mnist",
    storage: Storage = None,
    trial: Annotated[Optional[int], typer.Option("--trial", callback=bounded(0), help="Certify this trial instead of the winner.")] = None,
    target: Annotated[Optional[float], typer.Option(callback=bounded(0, 100, " percent"), help="Pareto studies: certify the smallest "
                                                   "network whose validation accuracy reached this percentage.")] = None,
    front: Annotated[bool, typer.Option("--front", help="Certify every trial on the accuracy/size front at or above "
                                        "--floor, smallest first; writes front.json.")] = False,
    floor: Annotated[Optional[float], typer.Option(callback=bounded(0, 100, " percent"), help=(
        "With --front: the lowest validation accuracy certified, percent [default: the study's target minus 0.4, "
        "99.0 on MNIST, as the search's --floor]."))] = None,
    seeds: Seeds = 3,
    epochs: CertifyEpochs = None,
    max_params: CertifyMaxParams = RULES.max_params,
    device: Device = DeviceName.auto,
    data_dir: DataDir = None,
    results_dir: Annotated[str, typer.Option(help="Where the study's files are.")] = "results",
) -> None:
    """Retrain the winner on all 60,000 training images with several seeds and certify it on the test set."""
    from search.console import print_front
    from search.options import default_floor
    from search.record import study_dataset, study_target
    from search.retrain import (certificate_dir, front_summary, front_to_certify, from_trial, pick_winner,
                                with_recipe, write_best)
    from search.storage import SearchError

    if front and (trial is not None or target is not None):
        raise fail("--front certifies the whole front; it takes neither --trial nor --target")
    _refuse_epochs(epochs)
    study_obj = _open_study(study, storage, results_dir)
    _check_run_inputs(device, data_dir, study_dataset(study_obj))
    study_goal = study_target(study_obj)  # a fraction, or None for a study made without a target
    if front and floor is None:
        if study_goal is None:
            raise fail(f"study '{study}' has no target accuracy, so no default floor: give --floor PERCENT")
        floor = default_floor(study_goal) * 100
    try:
        records = front_to_certify(study_obj, floor / 100) if front else [
            pick_winner(study_obj, trial, None if target is None else target / 100)]
        chosen = [with_recipe(from_trial(study_obj, r), epochs=epochs) for r in records]
    except (SearchError, ValueError) as exc:
        raise fail(str(exc)) from None
    if front:
        console.print(f"certifying the front at or above {floor:.2f}% validation: trials "
                      + ", ".join(f"{r.number} ({r.n_params:,} params, {r.values[0]:.2%})" for r in records),
                      highlight=False)
    elif chosen[0].cfg.epochs < RULES.max_epochs and epochs is None:
        console.print(f"note: trial {records[0].number} was searched with {chosen[0].cfg.epochs} epochs and is "
                      f"retrained with as many; --epochs {RULES.max_epochs} certifies it with the exercise's full "
                      "allowance", highlight=False)
    # With --front, front.json is written after each trial: an interrupted --front keeps what it certified.
    certs = _certify_all(chosen, seeds=seeds, data_dir=data_dir, device=device.value, results_dir=results_dir,
                         max_params=max_params, target=study_goal, reuse=front,
                         after_each=(lambda done: front_summary(study, floor / 100, seeds, done, results_dir))
                         if front else None)
    if front:
        summary = front_summary(study, floor / 100, seeds, certs, results_dir)
        print_front(summary)
        console.print(f"written: {Path(results_dir) / study / 'front.json'} and one certificate per trial under "
                      f"{certificate_dir(results_dir, '').resolve()}", highlight=False)
        return
    write_best(results_dir, certs[0][0])
    console.print(f"written: {certificate_dir(results_dir, chosen[0].name) / 'certificate.json'} (and "
                  f"{Path(results_dir) / study / 'best.json'}) and one checkpoint per seed", highlight=False)
    if not certs[0][0]["certified"]:
        raise typer.Exit(1)


class OptimizerName(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class ScheduleName(str, Enum):
    onecycle = "onecycle"
    cosine = "cosine"
    step = "step"


@app.command()
def certify(
    target: Annotated[Optional[str], typer.Argument(help="A preset name, a spec JSON file, or path/to/file.py:ClassName "
                                                    "(or --study S --trial N for a stored trial).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="With --trial: the study of a stored trial.")] = None,
    trial: Annotated[Optional[int], typer.Option("--trial", callback=bounded(0), help="A stored trial of --study.")] = None,
    storage: Storage = None,
    name: Annotated[Optional[str], typer.Option(help="Folder name under <results>/certified/ [default: the preset, "
                                                "file or class name, or <study>-trial-<N>].")] = None,
    seeds: Seeds = 3,
    epochs: CertifyEpochs = None,
    optimizer: Annotated[Optional[OptimizerName], typer.Option(help="Recipe override [default: the trial's, else sgd].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [default: the trial's, else 0.1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(callback=bounded(1, 60_000), help="Images per step [default: the trial's, else 64].")] = None,
    schedule: Annotated[Optional[ScheduleName], typer.Option(help="[default: the trial's, else onecycle].")] = None,
    augment: Annotated[Optional[float], typer.Option(help="Affine augmentation strength, 0 to 3 [default: the trial's, else 0.5].")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="[default: the trial's, else 0.05].")] = None,
    max_params: CertifyMaxParams = RULES.max_params,
    dataset: Annotated[Optional[str], typer.Option(help=f"The image set: {DATASET_HELP} [default: the study's, else "
                                                   "mnist].")] = None,
    target_accuracy: Target = None,
    device: Device = DeviceName.auto,
    data_dir: DataDir = None,
    results_dir: Annotated[str, typer.Option(help="Where certificates go (<results>/certified/<name>/).")] = "results",
) -> None:
    """Train and certify any network against the four rules: a preset, a spec JSON, your own nn.Module class, or a
    stored trial. Exits 1 before training if a rule already fails."""
    from models.load import split_module_target
    from models.presets import PRESETS
    from models.spec import NetSpec
    from search.engine import TrainConfig
    from search.data import KNOWN, load_data
    from search.record import study_target
    from search.retrain import Certifiable, from_trial, pick_winner, with_recipe
    from search.storage import SearchError, check_study_name

    if (target is None) == (trial is None):
        raise fail("give a TARGET (preset, spec JSON, file.py:Class) or --study S --trial N, one of the two")
    _refuse_epochs(epochs)
    _check_run_inputs(device, data_dir, dataset or "mnist")
    try:
        if trial is not None:
            study_obj = _open_study(study or "mnist", storage, results_dir)
            c = from_trial(study_obj, pick_winner(study_obj, trial))
            if dataset is not None and dataset != c.dataset:
                raise SearchError(f"--dataset {dataset}: study {study_obj.study_name!r} searched {c.dataset}")
            study_given = study_target(study_obj)
        else:
            net = _load_target(target)
            cfg = TrainConfig(epochs=RULES.max_epochs)
            module_target = split_module_target(target)
            if isinstance(net, NetSpec):
                kind = "preset" if target in PRESETS else "spec"
                c = Certifiable(Path(target).stem, {"kind": kind, "target": target}, cfg, spec=net)
            else:
                path, class_name = module_target
                c = Certifiable(class_name, {"kind": "module", "target": target}, cfg, module_path=path,
                                module_class=class_name)
        c.name = check_study_name(name if name is not None else c.name, "--name")
        if trial is None:
            c.dataset = dataset or "mnist"
            c.classes = load_data(data_dir, dataset=c.dataset).classes  # the logits a module must output
            study_given = KNOWN[c.dataset].target if c.dataset in KNOWN else None
        c = with_recipe(c, epochs=epochs, optimizer=optimizer and optimizer.value, lr=lr, batch_size=batch_size,
                        schedule=schedule and schedule.value, augment=augment, label_smoothing=label_smoothing)
    except (SearchError, ValueError) as exc:
        raise fail(str(exc)) from None
    judged = target_accuracy / 100 if target_accuracy is not None else study_given
    certs = _certify_all([c], seeds=seeds, data_dir=data_dir, device=device.value, results_dir=results_dir,
                         max_params=max_params, target=judged)
    from search.retrain import certificate_dir

    console.print(f"written: {certificate_dir(results_dir, c.name) / 'certificate.json'} and one checkpoint per seed",
                  highlight=False)
    if not certs[0][0]["certified"]:
        raise typer.Exit(1)


@app.command()
def export(
    certificate: Annotated[Optional[str], typer.Option(help="A certificate.json [default: the latest under "
                                                       "<results>/certified/].")] = None,
    seed: Annotated[Optional[int], typer.Option(callback=bounded(0), help="The seed's checkpoint to export [default: "
                                                "the one with the best final test accuracy].")] = None,
    module: Annotated[Optional[str], typer.Option(help="path/to/file.py:Class, for the certificate of a module of "
                                                  "one's own: imported (and so run) only when named here, and only if "
                                                  "its source has the sha256 the certificate recorded [default: "
                                                  "none, which a spec's certificate needs].")] = None,
    out: Annotated[Optional[str], typer.Option(help="Folder for the files [default: export/ beside the "
                                               "certificate].")] = None,
    data_dir: DataDir = None,
    results_dir: Annotated[str, typer.Option(help="Where certificates are.")] = "results",
) -> None:
    """ONNX and TorchScript files of a certified network, BatchNorm folded into the convs, each checked on the
    10,000 test images against the checkpoint; and a model card, MODEL.md. The certificate is verified first
    against its checkpoints (digests, spec, config, the rules judged again, every seed's test accuracy measured
    again): a disagreement is exit 1 naming the field, with nothing written."""
    from models.load import TargetError
    from search.certificate import CertificateError, CheckpointError, EvidenceMismatch
    from search.data import DataError, check_data_root
    from search.export import ExportError, export as export_network, latest_certificate, prepare
    from search.fsio import UnwritablePath, check_writable

    try:
        check_data_root(data_dir)
        path = Path(certificate) if certificate else latest_certificate(results_dir)
        prepare(path, seed, module)
        check_writable(Path(out) if out else path.parent / "export")
        result = export_network(path, Path(out) if out else None, data_dir, seed, module_target=module,
                                log=lambda line: console.print(line, highlight=False, markup=False))
    except EvidenceMismatch as exc:
        raise fail(f"{path}: {exc}; nothing written", code=1) from None
    except ExportError as exc:
        raise fail(str(exc), code=1) from None
    except (DataError, CertificateError, CheckpointError, TargetError, UnwritablePath) as exc:
        raise fail(str(exc)) from None
    if result.failed_rules:
        err.print(Text.assemble(("warning: ", "bold yellow"), f"{path.parent.name} fails "
                                f"{'; '.join(result.failed_rules)} (judged again from its checkpoints); exported "
                                "anyway, and its card says so"))
    acc = result.accuracy
    console.print(f"test accuracy: checkpoint {acc['checkpoint']:.2%}, BatchNorm folded {acc['folded']:.2%}, ONNX "
                  f"{acc['onnx']:.2%}, TorchScript {acc['torchscript']:.2%} (seed {result.seed})", highlight=False)
    console.print(f"written: {result.onnx}, {result.torchscript}, {result.card}; {result.n_params:,} parameters, "
                  f"{result.n_params_folded:,} with BatchNorm folded", highlight=False)


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
    (best_cert, best_problem), (front, front_problems) = read_best(results_dir, study), read_front(results_dir, study)
    for problem in filter(None, [best_problem, *front_problems]):  # shown only once their evidence bears them out
        err.print(Text.assemble(("warning: ", "bold yellow"), problem))
    path = write_report(study_obj, results_dir, best_cert, front)
    from search.record import count_trained, outcome_counts

    counts = outcome_counts(study_obj)
    console.print(f"report: {path} ({count_trained(study_obj)} trained, {counts.get('rejected', 0)} rejected, "
                  f"{counts.get('queued', 0)} queued)", highlight=False)
    if open_browser:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            err.print("no browser found here; open the file above by hand")


@app.command()
def data(data_dir: DataDir = None, dataset: Dataset = "mnist") -> None:
    """Check a set's files under the data root (header, counts, shape, size, md5) and print the split sizes."""
    from search.data import KNOWN, DataError, check_data_root, load_data

    try:
        check_data_root(data_dir, dataset)
        found = load_data(data_dir, dataset=dataset, with_test=True)
    except DataError as exc:
        raise fail(str(exc)) from None
    verified = ("all four files match the published md5 sums" if dataset in KNOWN and KNOWN[dataset].md5 else
                "files checked (header, counts, shape); md5 sums recorded: " + ", ".join(
                    f"{name} {digest}" for name, digest in sorted(found.md5.items())))
    console.print(f"{dataset} under {found.root}: {len(found.train):,} train, {len(found.val):,} validation (held out "
                  f"from the training set), {len(found.test):,} test images; {found.classes} classes; normalised "
                  f"with mean {found.mean:.4f}, std {found.std:.4f}; {verified}", highlight=False)


if __name__ == "__main__":
    app()
