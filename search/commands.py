"""The logic of `check`, `best`, `certify` and `export`, callable from Python with the CLI's behaviour: each takes
the command's values, says its progress through `log` and `warn`, returns what the CLI prints, and raises
`search.refusals.CommandError` (with its exit code) where the CLI refuses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from models.rules import RULES
from search.data import DataError, check_data_root
from search.errors import SearchError
from search.fsio import UnwritablePath
from search.refusals import CommandError, Refused, certification_stops

Log = Callable[[str], None]
BEFORE_TRAINING = "REFUSED before training"


def load_checked(target: str):
    """A preset name, a spec JSON file, or path/to/file.py:ClassName -> NetSpec or nn.Module; unusable (exit 2) or,
    for a spec whose maps shrink below 1x1, refused (exit 1: a network the rules refuse)."""
    from models.load import RefusedSpec, TargetError, load_target

    try:
        return load_target(target)
    except RefusedSpec as exc:
        raise Refused(str(exc)) from None
    except TargetError as exc:
        raise CommandError(str(exc)) from None


def judge_target(net, max_params: int = RULES.max_params):
    """The verdict on a spec or a module. A spec small enough to build is judged again as the module it builds, and
    that verdict wins where the two disagree (defence in depth); a larger spec is judged on its count alone."""
    from models.budget import check, check_module
    from models.build import build
    from models.spec import MAX_BUILT_PARAMS, NetSpec
    from search.data import MNIST_CLASSES

    if not isinstance(net, NetSpec):
        return check_module(net, max_params=max_params, num_classes=MNIST_CLASSES)
    verdict = check(net, max_params)
    if verdict.n_params <= MAX_BUILT_PARAMS:
        built = check_module(build(net), max_params=max_params, num_classes=MNIST_CLASSES)
        if built.ok != verdict.ok or built.n_params != verdict.n_params:
            return built
    return verdict


def check_command(target: str, max_params: int = RULES.max_params):
    """`check`: (the loaded network, its verdict)."""
    net = load_checked(target)
    return net, judge_target(net, max_params)


def check_with_resources(target: str, max_params: int = RULES.max_params, bounds: dict[str, int] | None = None):
    """`check`: (the network, its verdict, its int8 resource figures (models/resources.py), the reasons it fails
    the microcontroller `bounds` (metric -> bound, search/budgets.py; exclusive, as the search's))."""
    from models.resources import resources_of
    from search.budgets import resource_refusals

    net, verdict = check_command(target, max_params)  # the bounds' range is the CLI's (search/option_table.py)
    resources = resources_of(net, verdict)
    return net, verdict, resources, resource_refusals(resources, {m: b for m, b in (bounds or {}).items() if b})


def open_study(study: str, storage: Optional[str], results_dir: str):
    """The stored study, and its results folder checked writable and owned by its storage (best and report write
    there)."""
    from search.storage import (check_results_folder, check_study_name, claim_results_folder, load_existing_study,
                                sqlite_file, storage_url)

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
        raise CommandError(str(exc)) from None
    return study_obj


def refuse_epochs(epochs: Optional[int]) -> None:
    """More epochs than the rules allow: a refusal (exit 1) before any training, like a network over the budget."""
    if epochs is not None and epochs > RULES.max_epochs:
        raise Refused(f"--epochs {epochs}: the rules allow {RULES.epochs_rule()}", BEFORE_TRAINING)


def check_run_inputs(device: str, data_dir: Optional[str], dataset: str = "mnist") -> None:
    from search.engine import resolve_device

    try:
        resolve_device(device)
        check_data_root(data_dir, dataset)
    except (DataError, ValueError) as exc:
        raise CommandError(str(exc)) from None


@dataclass
class Certifying:
    """Where and how the networks are certified, and who hears of it: `log` and `warn` take lines, `show(result,
    seeds)` a finished certificate."""

    seeds: int
    data_dir: Optional[str]
    device: str
    results_dir: str
    max_params: int
    log: Log = print
    warn: Log = print
    show: Callable[[dict, int], None] | None = None


def certify_all(chosen, how: Certifying, target: Optional[float], reuse: bool = False,
                after_each: Callable | None = None, certs: list | None = None) -> list[tuple[dict, bool]]:
    """Certify each network (refusing, before any training, one that a rule already fails); [(certificate, reused)],
    appended to `certs` (a new list by default) as each is done. `after_each(certs so far)` runs after each."""
    from search.retrain import certify, refusal_before_training, reusable_certificate

    for c in chosen:
        refusal = refusal_before_training(c, how.max_params)
        if refusal:
            raise Refused(f"{c.label()}: {refusal}", BEFORE_TRAINING)
    certs = [] if certs is None else certs
    for c in chosen:
        reused, why_not = (reusable_certificate(how.results_dir, c, how.seeds, target, how.max_params, how.data_dir)
                           if reuse else (None, None))
        if why_not:
            how.warn(f"{c.label()}: its certificate is not reused, its evidence does not bear it out: {why_not}; "
                     "certifying again")
        if reused:
            how.log(f"{c.label()}: certified before with the same network, recipe and seeds, and its checkpoints bear "
                    "it out (digests, the rules judged again, the test accuracy measured again); its certificate is "
                    "reused")
            certs.append((reused, True))
            continue
        try:  # search/retrain.py says what trains, then a line per epoch
            result = certify(c, seeds=how.seeds, data_dir=how.data_dir, device=how.device,
                             results_dir=how.results_dir, max_params=how.max_params, target=target, log=how.log)
        except DataError as exc:
            raise CommandError(str(exc)) from None
        if how.show:
            how.show(result, how.seeds)
        certs.append((result, False))
        if after_each:
            after_each(certs)
    return certs


@dataclass
class BestChoice:
    """What `best` certifies: the stored trials, as Certifiables, and the floor (fraction) of a `--front`."""

    records: list
    chosen: list
    floor: Optional[float]
    target: Optional[float]  # the study's target accuracy (fraction), which the certificates judge


def choose_best(study_obj, trial: Optional[int], target: Optional[float], front: bool, floor: Optional[float],
                epochs: Optional[int]) -> BestChoice:
    """`best`'s choice (fractions, not percentages): `--trial`, the smallest trial at `--target`, the winner, or with
    `front` the trials on the front at or above the floor (default: the study's target less FLOOR_BELOW_TARGET)."""
    from search.options import default_floor
    from search.record import study_target
    from search.retrain import front_to_certify, from_trial, pick_winner, with_recipe

    study_goal = study_target(study_obj)  # a fraction, or None for a study made without a target
    if front and floor is None:
        if study_goal is None:
            raise CommandError(f"study '{study_obj.study_name}' has no target accuracy, so no default floor: give "
                               "--floor PERCENT")
        floor = default_floor(study_goal)
    try:
        records = front_to_certify(study_obj, floor) if front else [pick_winner(study_obj, trial, target)]
        chosen = [with_recipe(from_trial(study_obj, r), epochs=epochs) for r in records]
    except (SearchError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    return BestChoice(records, chosen, floor if front else None, study_goal)


def best_command(study: str, storage: Optional[str], how: Certifying, trial: Optional[int] = None,
                 target: Optional[float] = None, front: bool = False, floor: Optional[float] = None,
                 epochs: Optional[int] = None) -> tuple[BestChoice, list[tuple[dict, bool]], dict | None]:
    """`best` (fractions): (the choice, [(certificate, reused)], the front's summary or None); best.json, or with
    `front` front.json after each trial (an interrupted --front keeps what it certified), written."""
    if front and (trial is not None or target is not None):
        raise CommandError("--front certifies the whole front; it takes neither --trial nor --target")
    with certification_stops(front) as certs:  # Ctrl-C, SIGTERM: exit 130, 143, saying what is kept
        return _best(study, storage, how, trial, target, front, floor, epochs, certs)


def _best(study: str, storage: Optional[str], how: Certifying, trial: Optional[int], target: Optional[float],
          front: bool, floor: Optional[float], epochs: Optional[int], certs: list):
    from search.choose import size_words, winner_line
    from search.record import candidates, study_dataset, study_size_metric
    from search.retrain import front_summary, write_best

    refuse_epochs(epochs)
    study_obj = open_study(study, storage, how.results_dir)
    check_run_inputs(how.device, how.data_dir, study_dataset(study_obj))
    choice = choose_best(study_obj, trial, target, front, floor, epochs)
    metric = study_size_metric(study_obj)
    if front:
        how.log(f"certifying the front at or above {choice.floor:.2%} validation: trials " + ", ".join(
            f"{r.number} ({r.n_params:,} params{size_words(r, metric)}, {r.values[0]:.2%})" for r in choice.records))
    elif trial is None and target is None:  # the winner rule, in words
        how.log("certifying " + winner_line(candidates(study_obj), metric))
    if not front and choice.chosen[0].cfg.epochs < RULES.max_epochs and epochs is None:
        how.log(f"note: trial {choice.records[0].number} was searched with {choice.chosen[0].cfg.epochs} epoch"
                f"{'s' if choice.chosen[0].cfg.epochs != 1 else ''} and "
                f"is retrained with as many; --epochs {RULES.max_epochs} certifies it with the exercise's full "
                "allowance")
    summarise = ((lambda done: front_summary(study, choice.floor, how.seeds, done, how.results_dir, metric)) if front
                 else None)
    certify_all(choice.chosen, how, choice.target, reuse=front, after_each=summarise, certs=certs)
    if front:
        return choice, certs, summarise(certs)
    write_best(how.results_dir, certs[0][0])
    return choice, certs, None


def to_certify(target: Optional[str], study: Optional[str], trial: Optional[int], storage: Optional[str],
               results_dir: str, name: Optional[str], dataset: Optional[str], data_dir: Optional[str], **recipe):
    """`certify`'s network: a stored trial (`study`, `trial`) or a TARGET (preset, spec JSON, file.py:Class) trained
    with the exercise's epochs; named `name`, with `recipe` (TrainConfig fields, None: unchanged) over its own. Returns
    (the Certifiable, the target accuracy it is judged against by default: the study's, or the set's)."""
    from models.load import split_module_target
    from models.presets import PRESETS
    from models.spec import NetSpec
    from search.data import KNOWN, load_data
    from search.engine import recipe_for
    from search.record import study_target
    from search.retrain import Certifiable, from_trial, pick_winner, with_recipe
    from search.storage import check_study_name

    try:
        if trial is not None:
            study_obj = open_study(study or "mnist", storage, results_dir)
            c = from_trial(study_obj, pick_winner(study_obj, trial))
            if dataset is not None and dataset != c.dataset:
                raise SearchError(f"--dataset {dataset}: study {study_obj.study_name!r} searched {c.dataset}")
            goal = study_target(study_obj)
        else:
            net = load_checked(target)
            cfg = recipe_for(judge_target(net).n_params, epochs=RULES.max_epochs)  # the recipe by the net's size
            if isinstance(net, NetSpec):
                kind = "preset" if target in PRESETS else "spec"
                c = Certifiable(Path(target).stem, {"kind": kind, "target": target}, cfg, spec=net)
            else:
                path, class_name = split_module_target(target)
                c = Certifiable(class_name, {"kind": "module", "target": target}, cfg, module_path=path,
                                module_class=class_name)
        c.name = check_study_name(name if name is not None else c.name, "--name")
        if trial is None:
            c.dataset = dataset or "mnist"
            c.classes = load_data(data_dir, dataset=c.dataset).classes  # the logits a module must output
            goal = KNOWN[c.dataset].target if c.dataset in KNOWN else None
        return with_recipe(c, **recipe), goal
    except (SearchError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def certify_command(target: Optional[str], how: Certifying, *, study: Optional[str] = None,
                    trial: Optional[int] = None, storage: Optional[str] = None, name: Optional[str] = None,
                    dataset: Optional[str] = None, target_accuracy: Optional[float] = None, **recipe):
    """`certify` (target_accuracy a fraction; None: the study's or the set's): (the Certifiable, its certificate)."""
    if (target is None) == (trial is None):
        raise CommandError("give a TARGET (preset, spec JSON, file.py:Class) or --study S --trial N, one of the two")
    if trial is not None and study is None:  # no default study here: a trial number means nothing without one
        raise CommandError(f"--trial {trial} needs --study, the study the trial is stored in (--study S --trial {trial})")
    refuse_epochs(recipe.get("epochs"))
    with certification_stops():  # Ctrl-C, SIGTERM: exit 130, 143, saying what is kept
        check_run_inputs(how.device, how.data_dir, dataset or "mnist")
        c, goal = to_certify(target, study, trial, storage, how.results_dir, name, dataset, how.data_dir, **recipe)
        certs = certify_all([c], how, target_accuracy if target_accuracy is not None else goal)
    return c, certs[0][0]


def export_command(certificate: Optional[str], seed: Optional[int], module: Optional[str], out: Optional[str],
                   data_dir: Optional[str], results_dir: str, log: Log = print, int8: bool = False):
    """`export`: the certificate (the latest under results_dir by default) read and its seed and --module checked
    before any heavy work, the output folder checked writable, then verified against its checkpoints and exported.
    Returns (its path, search.export.Exported); a disagreement with the evidence, or a failed export, is exit 1 with
    nothing written."""
    from models.load import TargetError
    from search.certificate import CertificateError, CheckpointError, EvidenceMismatch
    from search.export import ExportError, export, latest_certificate, prepare
    from search.fsio import check_writable

    path = None
    try:
        check_data_root(data_dir)
        path = Path(certificate) if certificate else latest_certificate(results_dir)
        prepare(path, seed, module)
        check_writable(Path(out) if out else path.parent / "export")
        return path, export(path, Path(out) if out else None, data_dir, seed, module_target=module, log=log,
                            int8=int8)
    except EvidenceMismatch as exc:
        raise CommandError(f"{path}: {exc}; nothing written", 1) from None
    except ExportError as exc:
        raise CommandError(str(exc), 1) from None
    except (DataError, CertificateError, CheckpointError, TargetError, UnwritablePath) as exc:
        raise CommandError(str(exc)) from None


def report_command(study: str, storage: Optional[str], results_dir: str, warn: Log = print):
    """`report`: results/<study>/report.html written, with best.json and front.json shown only once their evidence
    bears them out (each problem said through `warn`). Returns (its path, a one-line count of the study's trials)."""
    from search.record import count_trained, outcome_counts
    from search.report import write_report
    from search.retrain import read_best, read_front

    study_obj = open_study(study, storage, results_dir)
    (best_cert, best_problem), (front, front_problems) = read_best(results_dir, study), read_front(results_dir, study)
    for problem in filter(None, [best_problem, *front_problems]):
        warn(problem)
    path = write_report(study_obj, results_dir, best_cert, front)
    counts = outcome_counts(study_obj)
    return path, (f"{count_trained(study_obj)} trained, {counts.get('rejected', 0)} rejected, "
                  f"{counts.get('queued', 0)} queued")


def data_command(data_dir: Optional[str], dataset: str = "mnist") -> str:
    """`data`: a set's four files checked under the data root (header, counts, shape, size, and every md5 computed
    now, never taken from the cache); one line saying what was found and checked."""
    from search.data import KNOWN, load_data

    try:
        check_data_root(data_dir, dataset, recompute_md5=True)  # the explicit check: no sum taken from the cache
        found = load_data(data_dir, dataset=dataset, with_test=True)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    verified = ("the md5 sums of all four files, computed now, match the published ones"
                if dataset in KNOWN and KNOWN[dataset].md5 else
                "files checked (header, counts, shape); md5 sums, computed now: " + ", ".join(
                    f"{name} {digest}" for name, digest in sorted(found.md5.items())))
    return (f"{dataset} under {found.root}: {len(found.train):,} train, {len(found.val):,} validation (held out "
            f"from the training set), {len(found.test):,} test images; {found.classes} classes; normalised with mean "
            f"{found.mean:.4f}, std {found.std:.4f}; {verified}")
