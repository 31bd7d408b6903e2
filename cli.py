"""budgetnas: architecture search for small convolutional networks under a hard parameter budget.

Thin: each command parses its options and calls one function of the package.
Exit codes: 0 success, 1 refused (a network over the budget, a failed certification), 2 unusable input.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search small conv nets under a parameter budget (MNIST, <20k params, no Linear, <=20 epochs).")
console = Console()
err = Console(stderr=True, soft_wrap=True)

MaxParams = Annotated[int, typer.Option("--max-params", min=1, help="Budget: networks must have fewer parameters.")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding MNIST/raw/*-ubyte "
                                                "[default: $BUDGETNAS_DATA, else ./data].")]
Study = Annotated[str, typer.Option("--study", help="Study name.")]
Storage = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL "
                                                "[default: sqlite:///results/<study>.db].")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
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
        try:
            return cls()
        except Exception as exc:
            raise fail(f"{target}() could not be instantiated without arguments: {type(exc).__name__}: {exc}") from None
    path = Path(target)
    if not path.is_file():
        raise fail(f"{target!r} is neither a preset ({', '.join(presets.PRESETS)}), a spec JSON file, "
                   "nor path/to/file.py:ClassName")
    try:
        return NetSpec.from_json(path.read_text())
    except SpecError as exc:
        raise fail(f"{path}: {exc}") from None


def print_layer_table(analysis, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col, justify in (("layer", "left"), ("op", "left"), ("output", "right"), ("params", "right"),
                         ("receptive field", "right"), ("MACs", "right")):
        table.add_column(col, justify=justify)
    for row in analysis.layers:
        table.add_row(row.name, row.op, "x".join(map(str, row.out_shape)), f"{row.n_params:,}",
                      "-" if row.receptive_field is None else f"{row.receptive_field}", f"{row.macs:,}")
    table.add_section()
    table.add_row("total", "", "", f"{analysis.n_params:,}",
                  "-" if analysis.receptive_field is None else str(analysis.receptive_field), f"{analysis.macs:,}")
    console.print(table)


@app.command()
def check(target: Annotated[str, typer.Argument(help="A preset name, a spec JSON file, or path/to/file.py:ClassName.")],
          max_params: MaxParams = 20_000) -> None:
    """Count parameters, receptive field and MACs per layer, and judge the network against the rules."""
    from models.budget import check as check_spec, check_module
    from models.build import build
    from models.spec import NetSpec

    net = _load_target(target)
    if isinstance(net, NetSpec):
        verdict = check_spec(net, max_params)
        module_verdict = check_module(build(net), max_params=max_params, num_classes=net.num_classes)
        if module_verdict.ok != verdict.ok or module_verdict.n_params != verdict.n_params:  # defence in depth
            verdict = module_verdict
    else:
        verdict = check_module(net, max_params=max_params)
    print_layer_table(verdict.analysis, f"{target}")
    if verdict.receptive_field is not None:
        console.print(f"receptive field before global pooling: {verdict.receptive_field} pixels")
    if verdict.ok:
        console.print(f"[bold green]{verdict.summary()}[/]", highlight=False)
        return
    console.print("[bold red]REFUSED[/]")
    for reason in verdict.reasons:
        console.print(f"  - {reason}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def show(preset: Annotated[str, typer.Argument(help="A preset name.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the spec as JSON, to edit and pass to check.")] = False
         ) -> None:
    """Print a preset's spec (JSON with --json) so it can be edited."""
    from models import presets
    from models.budget import analyze

    if preset not in presets.PRESETS:
        raise fail(f"unknown preset {preset!r}; known: {', '.join(presets.PRESETS)}")
    spec = presets.PRESETS[preset]
    if as_json:
        print(spec.to_json())
    else:
        print_layer_table(analyze(spec), preset)


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
