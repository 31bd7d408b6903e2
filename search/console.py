"""What the CLI prints: rich tables of layers, trials and verdicts, and one line per finished trial."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from models.rules import RULES
from search.budgets import front_columns
from search.choose import winner_line
from search.record import Outcome, TrialRecord, accuracy, candidates, leaderboard
from search.storage import describe_storage
from search.tally import tally_of

console = Console(soft_wrap=True)  # log lines stay whole in files and CI logs


def print_layer_table(analysis, title: str, resources=None) -> None:
    """One row per layer; with `resources` (models/resources.py), two more columns: the int8 bytes of the maps the
    layer reads and writes ("-" for a layer that runs in place or is folded, "?" where not measured) and of its
    weights, bias and scales; the total row has the peak activation bytes and the int8 model size."""
    table = Table(title=title, title_justify="left")
    columns = [("layer", "left"), ("op", "left"), ("output", "right"), ("params", "right"),
               ("receptive field", "right"), ("MACs", "right")]
    costs = {c.name: c for c in resources.layers} if resources is not None else None
    for col, justify in columns + ([("activation bytes", "right"), ("int8 bytes", "right")] if costs is not None
                                   else []):
        table.add_column(col, justify=justify)
    for row in analysis.layers:
        cost = costs.get(row.name) if costs is not None else None
        extra = [] if costs is None else (["-", "-"] if cost is None else ["?", "?"] if not cost.measured else
                                          [f"{cost.activation_bytes:,}" if cost.activation_bytes else "-",
                                           f"{cost.int8_bytes:,}" if cost.int8_bytes else "-"])
        table.add_row(row.name, row.op, "x".join(map(str, row.out_shape)), f"{row.n_params:,}",
                      "-" if row.receptive_field is None else f"{row.receptive_field}", f"{row.macs:,}", *extra)
    table.add_section()
    total = [] if costs is None else [_bytes(resources.peak_activation_bytes), _bytes(resources.int8_bytes)]
    table.add_row("total", "", "", f"{analysis.n_params:,}",
                  "-" if analysis.receptive_field is None else str(analysis.receptive_field), f"{analysis.macs:,}",
                  *total)
    # As wide as the table needs: where the output is no terminal (a file, a pipe) rich assumes 80 columns and would
    # cut the column names and the figures short.
    # (print's own width= is capped at the console's).
    natural = Measurement.get(console, console.options.update(width=400), table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def _bytes(value) -> str:
    return "?" if value is None else f"{value:,}"


def print_trial_line(study_obj, trial, opts) -> None:
    """One line for a finished trial, with the study's running figures (read from the trials that changed only)."""
    record = TrialRecord(trial)
    if record.outcome == Outcome.REJECTED:
        return  # already logged when it happened
    tally = tally_of(study_obj).refresh()
    counts = tally.counts()
    figure = f"val {record.values[0]:.2%}" if record.values else record.reason
    top = tally.best_network()
    top_line = "-" if top is None else f"{top[1]:.2%} at {top[0].n_params:,} params (trial {top[0].number})"
    seconds = f", {record.wall_s:.0f} s" if record.wall_s else ""
    console.print(
        f"trial {trial.number} {record.outcome}: {record.n_params or 0:,} params, {figure}{seconds} | "
        f"{tally.trained()}/{opts.trials} trained, {counts.get('rejected', 0)} rejected, "
        f"{counts.get('pruned', 0)} pruned | best {top_line}", highlight=False, markup=False)


def print_leaderboard(result, opts) -> None:
    from search.run import summary_line

    done = candidates(result.study)  # read once: the leaderboard's networks and the winner rule's runs
    nets, runs = leaderboard(done)
    table = Table(title=summary_line(opts.study, result.trained, result.counts, result.wall_s), title_justify="left")
    # "val acc" is the network's: the mean over its runs (a re-run with another seed counts with its original).
    for col in ("trial", "val acc", "runs", "params", "RF", "epochs", "optimizer", "lr", "seconds"):
        table.add_column(col, justify="right")
    for r in nets[:10]:
        table.add_row(str(r.number), f"{accuracy(r, runs):.2%}", str(len(runs[r.number])), f"{r.n_params:,}",
                      str(r.receptive_field), str(r.epochs_trained), r.config.optimizer, f"{r.config.lr:.3g}",
                      f"{r.wall_s or 0:.0f}")
    console.print(table)
    if nets and opts.objective == "accuracy":  # the network `best` certifies (search/choose.py)
        console.print("winner: " + winner_line(done), highlight=False)
    console.print(f"stored in {describe_storage(opts.storage_url)}; trials table: {result.csv_path}")



def print_verdict(result: dict, seeds: int) -> None:
    """The certificate's rules, PASS or FAIL, and the final-epoch test accuracy of every seed."""
    who = f"trial {result['trial']}" if result.get("trial") is not None else result.get("name", "the network")
    table = Table(title=f"{who} against the rules", title_justify="left")
    for col in ("rule", "figure", "verdict"):
        table.add_column(col)
    for rule in result["rules"]:
        table.add_row(rule["rule"], rule["figure"], "[green]PASS[/]" if rule["pass"] else "[red]FAIL[/]")
    console.print(table)
    target = result.get("target")
    per_seed = ", ".join(f"seed {r['seed']}: {RULES.accuracy_text(r['final_test_acc'], target)}"
                         for r in result["seeds"])
    if seeds > 1:
        per_seed += (f"; mean {RULES.accuracy_text(result['final_test_acc_mean'], target)} "
                     f"+- {result['final_test_acc_std']:.2%} (sample sd)")
    reached = (f"; {result['seeds_reaching_target']} of {seeds} seed{'s' if seeds > 1 else ''} reached "
               f"{target:.2%}" if target is not None else "")
    console.print(f"final-epoch test accuracy {per_seed}{reached}", highlight=False)


def print_front(summary: dict) -> None:
    """front.json as a table: validation against certified test accuracy for every front trial, smallest first, with
    its parameters and the study's size metric."""
    table = Table(title=f"study {summary['study']}: the front at or above {summary['floor']:.2%} validation, "
                        f"certified with {summary['seeds']} seed{'s' if summary['seeds'] > 1 else ''}",
                  title_justify="left")
    sizes = front_columns(summary.get("size_metric", "params"))
    for col in ("trial", *(heading for heading, _ in sizes), "validation", "test (mean +- sd)", "rules"):
        table.add_column(col, justify="right", no_wrap=col != "rules")
    for e in summary["entries"]:
        rules = "[green]all PASS[/]" if e["certified"] else "[red]FAIL: " + "; ".join(e["failed_rules"]) + "[/]"
        table.add_row(str(e["trial"]), *(f"{e[key]:,}" for _, key in sizes), f"{e['val_acc']:.2%}",
                      f"{RULES.accuracy_text(e['test_acc_mean'], summary.get('target'))} +- {e['test_acc_std']:.2%}",
                      rules)
    console.print(table)
