"""The command line's options as typer declares them: each description, and each bound from search/option_table.py
that a callback enforces, written once and shared by the commands of cli.py that take the option."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from models.rules import RULES
from search.option_table import (BOUNDS, DATA_ROOT, FLOOR_POINTS, INDEX, MNIST_FLOOR_PERCENT, MNIST_TARGET_PERCENT,
                                 PERCENT, RUNGS, SEARCH, SEARCH_IMAGES, SHRINKS, SMALL_NET_LABEL_SMOOTHING,
                                 SMALL_NET_PARAMS, TRAIN, WINNER_SHRINKS, Bound, DeviceName, Objective,
                                 OptimizerName, PrunerName, SamplerName, ScheduleName, SizeMetric)


def bounded(bound: Bound):
    """A typer callback that refuses a number outside the bound, naming the value and the limit."""
    def check_value(value):
        refusal = bound.refusal(value)
        if refusal:
            raise typer.BadParameter(refusal)
        return value
    return check_value


class PlainUsage(typer.core.TyperCommand):
    """A command whose usage line names a required argument as click does, `check [OPTIONS] TARGET`: typer 0.29
    writes `{target}`, which reads as a set of choices or a template to fill in."""

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


def option(help: str, bound: Bound | str | None = None, *names: str, **kw):
    """typer.Option with its description and, by name in BOUNDS or given, the bound its value must keep."""
    bound = BOUNDS[bound] if isinstance(bound, str) else bound
    return typer.Option(*names, callback=bounded(bound) if bound else None, help=help, **kw)


def _opt(kind, help: str, bound: Bound | str | None = None, *names: str, **kw):
    return Annotated[kind, option(help, bound, *names, **kw)]


DATASET_HELP = ("mnist, fashion-mnist, kmnist, or idx (four IDX files of 28x28 grey images and integer labels "
                "under --data-dir)")
# Shared by several commands.
MaxParams = _opt(int, "Budget: networks must have fewer parameters.", "max_params", "--max-params")
CertifyMaxParams = _opt(int, f"A budget judged beside the exercise's four rules (which always include fewer than "
                             f"{RULES.max_params:,}).", "max_params", "--max-params")
DataDir = _opt(Optional[str], f"Folder holding MNIST/raw/*-ubyte [default: {DATA_ROOT}].", None, "--data-dir")
Study = _opt(str, "Study name.", None, "--study")
Dataset = _opt(str, f"The image set: {DATASET_HELP}.", None, "--dataset")
Target = _opt(Optional[float], f"Target accuracy, percent [default: {MNIST_TARGET_PERCENT} for MNIST; none for other "
                               "sets, whose reports then draw no target line and whose certificates do not judge "
                               "accuracy].", PERCENT, "--target")
Storage = _opt(Optional[str], f"Optuna storage URL [default: sqlite:///{SEARCH['results_dir']}/<study>.db].", None,
               "--storage")
Device = _opt(DeviceName, "Where to train: auto (CUDA if present, else the CPU), cpu or cuda.")
ResultsDir = _opt(str, "Where the study's files are.")
Trial = _opt(Optional[int], "A stored trial of --study.", INDEX, "--trial")
# search
Trials = _opt(int, "Trained trials in the study (rejected candidates do not count).", "trials")
Epochs = _opt(int, f"Epochs per trial (the rules allow at most {RULES.max_epochs}).", "epochs")
ObjectiveOpt = _opt(Objective, "accuracy: maximise validation accuracy; pareto: also minimise parameters.")
Sampler = _opt(SamplerName, "Optuna sampler: tpe (multivariate TPE), random, or nsga2.")
Pruner = _opt(PrunerName, f"Stops weak trials early: sha = successive halving at epochs {RUNGS} (default; also for "
                          "pareto), hyperband, median, envelope (accuracy: stops only a trial that cannot come within "
                          "the seed spread of the best, by the completed trials' own gains) or none.")
Seed = _opt(int, "Sampler and training seed.")
Jobs = _opt(int, "Trials in parallel in this process (helps on a GPU).", "jobs")
Subset = _opt(Optional[int], f"Train on the first N training images (quick tries) [default: all {SEARCH_IMAGES:,}].",
              "subset")
SearchFloor = _opt(Optional[float], "Pareto: a trial that cannot reach this validation accuracy (percent) stops from "
                                    "epoch 3, judged by the largest gain the study's trials at the floor made after "
                                    f"that epoch [default: the target minus {FLOOR_POINTS}; none without a target].",
                   PERCENT)
Descend = _opt(Optional[bool], "Every other trial at most, an evolution step: a one-change child of a front member "
                               "(accuracy: of the incumbent), a tied member re-run; pareto, in turns: shrunk copies "
                               f"({SHRINKS} of the parameters) of the smallest trial at the target and at the floor "
                               "[default: on for --objective pareto, off for accuracy].")
WinnerBound = _opt(Optional[bool], "Accuracy: once the best has reached the target, reject, untrained, a sampled "
                                   "candidate with more parameters than the current winner (the smallest completed "
                                   "net within the seed spread of the best) [default: on for --objective accuracy, "
                                   "off for pareto].")
WinnerDescent = _opt(Optional[bool], "Accuracy: once the best has reached the target, every other trial at most, "
                                     f"the winner again with its widths fitted to {WINNER_SHRINKS} of its "
                                     "parameters, stopped early only when it cannot come within the seed spread of "
                                     "the best; a best of one run that bars a net within two spreads is re-run once "
                                     "with the next seed first; it costs full trainings: seed 0's default search "
                                     "took 49 instead of 15 minutes on 2 cores [default: off].")
MaxMacs = _opt(Optional[int], "Budget: networks must have fewer MACs per image [default: no bound].",
               "max_figure", "--max-macs")
MaxActivationBytes = _opt(Optional[int], "Budget: peak activation memory (int8 bytes, batch 1, the 28x28 input "
                                         "included) must stay under this [default: no bound].", "max_figure",
                          "--max-activation-bytes")
MaxModelBytes = _opt(Optional[int], "Budget: int8 model size (int8 weights, int32 biases, float32 scales; bytes) "
                                    "must stay under this [default: no bound].", "max_figure", "--max-model-bytes")
SizeMetricOpt = _opt(SizeMetric, "Pareto: the size minimised beside accuracy, and whose target each trial draws "
                                 "(needs its --max-* bound, except params).", None, "--size-metric")
WarmStart = _opt(bool, "Enqueue the presets as the first trials.")
Repair = _opt(bool, "Shrink over-budget candidates until they fit, instead of rejecting them.")
MaxRejections = _opt(int, "Stop after this many untrained candidates in a row.", "max_rejections")
MinRf = _opt(int, "Reject, untrained, candidates whose receptive field is smaller (pixels).", "min_rf")
SearchResultsDir = _opt(str, "Where the database, trials.csv and reports go.")
Threads = _opt(Optional[int], "CPU threads for this worker [default: cores / jobs]; with W workers on one machine, "
                              "give cores / W.", "threads")
Heartbeat = _opt(str, "Tests: heartbeat interval and grace, seconds.", hidden=True)
WorkerId = _opt(Optional[str], "Tests: play a worker on another host.", hidden=True)
# best and certify
Seeds = _opt(int, "Retraining seeds (0, 1, ...).", "seeds")
BestEpochs = _opt(Optional[int], f"Epochs to retrain, at most {RULES.max_epochs} to pass [default: the trial's, as "
                                 "searched].", "certify_epochs", "--epochs")
CertifyEpochs = _opt(Optional[int], f"Epochs to retrain, at most {RULES.max_epochs} to pass [default: the trial's "
                                    f"with --trial, else {TRAIN['epochs']}].", "certify_epochs", "--epochs")
BestTrial = _opt(Optional[int], "Certify this trial instead of the winner.", INDEX, "--trial")
BestTarget = _opt(Optional[float], "Pareto studies: certify the smallest network whose validation accuracy reached "
                                   "this percentage.", PERCENT)
Front = _opt(bool, "Certify every trial on the accuracy/size front at or above --floor, smallest first; writes "
                   "front.json.", None, "--front")
Floor = _opt(Optional[float], f"With --front: the lowest validation accuracy certified, percent [default: the study's "
                              f"target minus {FLOOR_POINTS}, {MNIST_FLOOR_PERCENT} on MNIST, as the search's --floor].",
             PERCENT)
TrialStudy = _opt(Optional[str], "With --trial: the study of a stored trial (required with --trial).", None,
                  "--study")
Name = _opt(Optional[str], "Folder name under <results>/certified/ [default: the preset, file or class name, or "
                           "<study>-trial-<N>].")
Optimizer = _opt(Optional[OptimizerName], f"Recipe override [default: the trial's, else {TRAIN['optimizer']}].")
Lr = _opt(Optional[float], f"Peak learning rate [default: the trial's, else {TRAIN['lr']}].")
BatchSize = _opt(Optional[int], f"Images per step [default: the trial's, else {TRAIN['batch_size']}].", "batch_size")
Schedule = _opt(Optional[ScheduleName], f"Learning-rate schedule over the epochs [default: the trial's, else "
                                        f"{TRAIN['schedule']}].")
Augment = _opt(Optional[float], f"Affine augmentation strength, 0 to 3 [default: the trial's, else "
                                f"{TRAIN['augment']}].")
LabelSmoothing = _opt(Optional[float], f"Label smoothing: the probability mass of each target spread over the other "
                                       f"classes [default: the trial's, else {SMALL_NET_LABEL_SMOOTHING} for a net of "
                                       f"at most {SMALL_NET_PARAMS:,} parameters, {TRAIN['label_smoothing']} above].")
CertifyDataset = _opt(Optional[str], f"The image set: {DATASET_HELP} [default: the study's, else "
                                     f"{SEARCH['dataset']}].")
CertifyResultsDir = _opt(str, "Where certificates go (<results>/certified/<name>/).")
# export
Certificate = _opt(Optional[str], "A certificate.json [default: the latest under <results>/certified/].")
ExportSeed = _opt(Optional[int], "The seed's checkpoint to export [default: the one with the best final test "
                                 "accuracy].", INDEX)
Module = _opt(Optional[str], "path/to/file.py:Class, for the certificate of a module of one's own: imported (and so "
                             "run) only when named here, and only if its source has the sha256 the certificate "
                             "recorded [default: none, which a spec's certificate needs].")
Out = _opt(Optional[str], "Folder for the files [default: export/ beside the certificate].")
Int8 = _opt(bool, "Also write model.int8.onnx (onnxruntime static quantisation, calibrated on training images) and "
                  "report its accuracy, size, activation memory and latency.", None, "--int8")
ExportResultsDir = _opt(str, "Where certificates are.")
# show and report
AsJson = _opt(bool, "Print the spec as JSON, to edit and pass to check.", None, "--json")
OpenBrowser = _opt(bool, "Open the report in a browser.", None, "--open")
