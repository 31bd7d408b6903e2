"""`export`: a certified network out of budgetnas, as an ONNX file any runtime loads and a torch.export program
(.pt2), with BatchNorm folded into the convs before it, each checked on the 10,000 test images, and a model card
(MODEL.md) beside them; with `int8`, also an int8 ONNX file (search/quantise.py), its accuracy beside the float one's.

The exported network takes normalised images, (batch, 1, 28, 28) float32: (pixel / 255 - mean) / std with MNIST's
mean and std, written into the ONNX file's metadata; the batch size is free. It returns 10 logits per image.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import platform
import shlex
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.budget import analyze
from models.rules import RULES
from search.certificate import CertificateError, Verified, check_module_option, read_certificate, verify
from search.engine import evaluate
from search.fsio import atomic_write_text
from search.quantise import INT8_NAME, int8_card, int8_expected, write_int8
from search.quantise import onnx_accuracy as _onnx_accuracy
from search.storage import provenance

OPSET = 20  # ONNX opset: current in onnxruntime 1.17 and later
TOLERANCE = 0.0001  # accuracy, as a fraction: an exported file must match its checkpoint to 0.01 points


class ExportError(RuntimeError):
    """An export that could not be made or does not compute what the checkpoint computes."""


@dataclass
class Exported:
    folder: Path
    onnx: Path
    program: Path  # model.pt2, torch.export
    card: Path
    n_params: int  # as trained
    n_params_folded: int  # BatchNorm folded into the convs
    accuracy: dict  # checkpoint, folded, onnx, pt2 (and int8): test accuracy (fractions)
    seed: int
    failed_rules: list[str]  # judged again from the checkpoints
    int8: dict | None = None  # search/quantise.py's figures of model.int8.onnx, with `export --int8`
    int8_path: Path | None = None


def latest_certificate(results_dir: str) -> Path:
    found = sorted(Path(results_dir).glob("certified/*/certificate.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CertificateError(f"no certificate under {Path(results_dir) / 'certified'}; run `best` or `certify` "
                               "first, or give --certificate PATH")
    return found[-1]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """The module in eval mode with every BatchNorm that follows a conv folded into the conv's weights and bias
    (torch.fx's conv-BN fusion). Dropout is the identity in eval mode and is removed first (budgetnas's own Dropout
    branches on the tensor, which a symbolic trace cannot follow)."""
    from torch.fx.experimental.optimization import fuse

    plain = copy.deepcopy(module).eval()
    for name, sub in list(plain.named_modules()):
        if isinstance(sub, nn.Dropout) and name:
            parent = plain.get_submodule(name.rpartition(".")[0]) if "." in name else plain
            setattr(parent, name.rpartition(".")[2], nn.Identity())
    try:
        return fuse(plain)
    except Exception as exc:  # a forward torch.fx cannot trace: exported as it is
        warnings.warn(f"BatchNorm not folded, the forward could not be traced: {type(exc).__name__}: {exc}",
                      stacklevel=2)
        return plain


def _write_onnx(model: nn.Module, path: Path, metadata: dict) -> None:
    """One self-contained ONNX file: torch's exporter may put the weights in `<name>.data` beside it; they are
    loaded back into the file, and a `.data` file left by this or an earlier export is deleted."""
    import onnx

    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                          verbose=False)
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path), save_as_external_data=False)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _write_program(model: nn.Module, path: Path) -> nn.Module:
    """torch.export's program of the folded network (dynamic batch size), saved and loaded back: the module run."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _guarded(what: str, step):
    """`step()`, with any failure said in one line (ExportError, exit 1) instead of a traceback: a network of one's
    own may use what torch.export or the quantiser cannot handle."""
    try:
        return step()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"{what} failed: {type(exc).__name__}: {first}") from None


@torch.no_grad()
def _program_accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of a loaded torch.export module, in batches of 1,000 (it has no eval(): nothing in it depends
    on the mode once BatchNorm is folded and dropout removed)."""
    correct = sum(int((module(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)


def choose_seed(cert: dict, seed: int | None) -> int:
    """`--seed`, which the certificate must have (CertificateError otherwise), or the seed with the best final test
    accuracy."""
    runs = {r["seed"]: r for r in cert["seeds"]}
    if seed is None:
        return max(runs, key=lambda s: (-1.0 if math.isnan(runs[s]["final_test_acc"]) else runs[s]["final_test_acc"],
                                        -s))
    if seed not in runs:
        raise CertificateError(f"--seed {seed}: the certificate has seed{'s' if len(runs) > 1 else ''} "
                               f"{', '.join(map(str, sorted(runs)))}")
    return seed


def prepare(certificate_path: Path, seed: int | None, module_target: str | None) -> tuple[dict, int]:
    """What is refused before any heavy work (CertificateError, exit 2): a certificate that fails its schema, a
    --seed it does not have, a module's certificate without --module (or a spec's with one)."""
    cert = read_certificate(certificate_path)
    chosen = choose_seed(cert, seed)
    check_module_option(cert, module_target)
    return cert, chosen


def rules_verdict(rules: list[dict], target: float | None) -> str:
    """One line for the ONNX metadata: what passed, judged again from the evidence, and against which target."""
    failed = [r["rule"] for r in rules if not r["pass"]]
    if failed:
        return "fails: " + "; ".join(failed)
    if target is None:
        return "the other rules pass; test accuracy not judged (no target)"
    if target < RULES.target_accuracy:
        return f"all pass against a target of {target:.2%}, below the exercise's {RULES.target_accuracy:.2%}"
    return "all four pass"


def export(certificate_path: Path, out_dir: Path | None = None, data_dir: str | None = None, seed: int | None = None,
           log=print, module_target: str | None = None, int8: bool = False) -> Exported:
    """Export one seed's checkpoint (by default the seed with the best final test accuracy) of a certificate, after
    verifying the certificate against its checkpoints and measuring every seed again (search/certificate.py):
    EvidenceMismatch, with nothing written, where they disagree. With `int8`, model.int8.onnx too."""
    cert, seed = prepare(Path(certificate_path), seed, module_target)
    verified = verify(cert, near=[Path(certificate_path).parent], module_target=module_target, data_dir=data_dir)
    module = verified.evidence[seed].module.eval()
    x, y = verified.test
    stats = (cert["dataset"]["mean"], cert["dataset"]["std"])
    start = time.perf_counter()
    fp32 = cert["seeds"][[r["seed"] for r in cert["seeds"]].index(seed)].get("precision") != "bf16"
    accuracy = {"checkpoint": verified.accuracy[seed] if fp32 else evaluate(module, x, y, bf16=False)[1]}
    folded = fold_batchnorm(module)
    accuracy["folded"] = evaluate(folded, x, y, bf16=False)[1]
    n_params = sum(p.numel() for p in module.parameters())
    n_folded = sum(p.numel() for p in folded.parameters())
    folder = Path(out_dir) if out_dir else Path(certificate_path).parent / "export"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"verified: {cert['name']}'s certificate against its {len(cert['seeds'])} checkpoint(s) (digests, spec, "
        f"config, the rules judged again, every seed's test accuracy measured again)")
    log(f"exporting {cert['name']} seed {seed}: {n_params:,} params, {n_folded:,} with BatchNorm folded")
    metadata = _metadata(verified, seed, accuracy["checkpoint"], n_params, n_folded)
    onnx_path, pt2_path = _write_float(folded, folder, metadata, (x, y), accuracy)
    figures = None
    if int8:
        figures = _guarded("int8 quantisation (model.int8.onnx)", lambda: write_int8(
            folder / INT8_NAME, onnx_path, cert["dataset"], data_dir, (x, y), accuracy, log))
        figures.update(int8_expected(folded, verified.spec))
    card = atomic_write_text(folder / "MODEL.md", model_card(verified, seed, accuracy, n_params, n_folded, stats,
                                                             figures))
    summary = {"certificate": str(Path(certificate_path).resolve()), "seed": seed, "accuracy": accuracy,
               "n_params": n_params, "n_params_folded": n_folded, "onnx": str(onnx_path), "pt2": str(pt2_path),
               "opset": OPSET, "int8": figures, "seconds": time.perf_counter() - start}
    atomic_write_text(folder / "export.json", json.dumps(summary, indent=2))
    return Exported(folder, onnx_path, pt2_path, card, n_params, n_folded, accuracy, seed,
                    [r["rule"] for r in verified.rules if not r["pass"]], figures,
                    folder / INT8_NAME if int8 else None)


def _metadata(verified: Verified, seed: int, checkpoint_acc: float, n_params: int, n_folded: int) -> dict:
    """The ONNX file's metadata: how to feed it, what it returns, where it comes from."""
    cert, record = verified.cert, verified.cert["dataset"]
    return {"dataset": record["name"],
            "input": "image: float32 (batch, 1, 28, 28), a grey 28x28 image normalised as (pixel / 255 - mean) / std",
            "normalisation_mean": f"{record['mean']}", "normalisation_std": f"{record['std']}",
            "output": f"logits: (batch, {record['classes']}), classes 0-{record['classes'] - 1}",
            "certificate": cert["name"], "n_params_trained": str(n_params), "n_params_folded": str(n_folded),
            "test_accuracy": f"{checkpoint_acc:.4f}", "seed": str(seed),
            "rules": rules_verdict(verified.rules, cert["target"])}


def _write_float(folded: nn.Module, folder: Path, metadata: dict, test: tuple, accuracy: dict) -> tuple[Path, Path]:
    """model.onnx and model.pt2, each run on the test images into `accuracy`; ExportError where one (or the folded
    network) differs from the checkpoint by more than TOLERANCE."""
    x, y = test
    onnx_path, pt2_path = folder / "model.onnx", folder / "model.pt2"
    _write_onnx(folded, onnx_path, metadata)
    accuracy["onnx"] = _onnx_accuracy(onnx_path, x, y)
    accuracy["pt2"] = _guarded("torch.export (model.pt2)", lambda: _program_accuracy(_write_program(folded, pt2_path),
                                                                                      x, y))
    for kind in ("folded", "onnx", "pt2"):
        gap = abs(accuracy[kind] - accuracy["checkpoint"])
        if gap > TOLERANCE:
            raise ExportError(f"the {kind} network's test accuracy {accuracy[kind]:.4%} differs from the checkpoint's "
                              f"{accuracy['checkpoint']:.4%} by {gap * 100:.3f} points (at most "
                              f"{TOLERANCE * 100:.2f} allowed); files left in {folder} for inspection")
    return onnx_path, pt2_path


def _card_verdict(verified: Verified) -> list[str]:
    rules, target = verified.rules, verified.cert["target"]
    failed = [r for r in rules if not r["pass"]]
    how = ("Judged again from the checkpoints when exported: parameters counted on the rebuilt network, the fully "
           "connected verdict on it, epochs from the training config, every seed's test accuracy measured again.")
    if failed:
        return ["**Verdict: FAILS " + "; ".join(f"{r['rule']} ({r['figure']})" for r in failed) + ".** Exported "
                "anyway on request; it is not a certified answer to the exercise. " + how, ""]
    return [f"**Verdict: {rules_verdict(rules, target)}.** {how}", ""]


def _card_network(verified: Verified, n_params: int, n_folded: int) -> list[str]:
    lines = ["## The network", "", f"{n_params:,} parameters as trained; {n_folded:,} with BatchNorm folded into the "
             "convs (the same function).", ""]
    spec = verified.spec  # the checkpoint's own, which the certificate's matched
    if spec is None:
        module = verified.cert["module"]
        return lines + [f"An nn.Module of its own: `{module['class']}` from `{module['path']}` (source sha256 "
                        f"{module['sha256']}).", ""]
    analysis = analyze(spec)
    lines += ["| layer | op | output | parameters | receptive field (px) | MACs |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r.name} | {r.op} | {'x'.join(map(str, r.out_shape))} | {r.n_params:,} | "
              f"{'-' if r.receptive_field is None else r.receptive_field} | {r.macs:,} |" for r in analysis.layers]
    return lines + ["", f"Receptive field before global pooling: {analysis.receptive_field} px; {analysis.macs:,} MACs "
                    "per image.", "", "Spec:", "", "```json", json.dumps(spec.to_dict(), indent=2), "```", ""]


def _card_reproduce(cert: dict, dataset: str) -> list[str]:
    """The commands, each word quoted for the shell: a certificate's text fields are its author's, not ours."""
    source, cfg = cert["source"], cert["config"]
    target = str(source.get("target", cert["name"]))
    if source["kind"] == "trial" and cert.get("study") is not None and cert.get("trial") is not None:
        again = ["certify", "--study", cert["study"], "--trial", str(cert["trial"])]
    else:
        again = ["certify", target] + (["--dataset", dataset] if dataset != "mnist" else [])
    again += ["--seeds", str(len(cert["seeds"])), "--epochs", str(cfg["epochs"])]
    export_again = ["export", "--certificate", f"results/certified/{cert['name']}/certificate.json"]
    export_again += ["--module", target] if cert.get("module") else []
    return ["## Reproduce", "", "```bash", shlex.join(["python", "cli.py", *again]),
            shlex.join(["python", "cli.py", *export_again]), "```", ""]


def model_card(verified: Verified, seed: int, accuracy: dict, n_params: int, n_folded: int,
               stats: tuple[float, float], int8: dict | None = None) -> str:
    """MODEL.md: what the network is, how it was trained and certified, and how to reproduce it; the rules and the
    accuracies are those judged and measured again on export, not the certificate's word."""
    cert = verified.cert
    dataset = cert["dataset"]["name"]
    lines = [f"# {cert['name']}", ""]
    lines += [f"A {dataset} classifier certified by budgetnas against the exercise's rules (fewer than "
              f"{RULES.max_params:,} parameters, no fully connected layer, at most {RULES.max_epochs} epochs, at "
              f"least {RULES.target_accuracy:.1%} final-epoch test accuracy).", ""]
    lines += _card_verdict(verified)
    lines += ["## Rules", "", "| rule | figure | verdict |", "| --- | --- | --- |"]
    lines += [f"| {r['rule']} | {r['figure']} | {'PASS' if r['pass'] else 'FAIL'} |" for r in verified.rules]
    finals = [verified.accuracy[r["seed"]] for r in cert["seeds"]]
    mean, sd = statistics.fmean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0
    lines += ["", "## Test accuracy (final epoch, 10,000 test images)", "", "| seed | accuracy |", "| ---: | ---: |"]
    lines += [f"| {r['seed']} | {verified.accuracy[r['seed']]:.2%} |" for r in cert["seeds"]]
    lines += [f"| mean +- sd | {mean:.2%} +- {sd:.2%} |", "",
              f"Exported: seed {seed}. Its accuracy as checkpoint {accuracy['checkpoint']:.2%}, with BatchNorm folded "
              f"{accuracy['folded']:.2%}, ONNX (onnxruntime) {accuracy['onnx']:.2%}, torch.export program (model.pt2) "
              f"{accuracy['pt2']:.2%}" + (f", int8 ONNX {accuracy['int8']:.2%}" if "int8" in accuracy else "") + ".",
              ""]
    lines += _card_network(verified, n_params, n_folded)
    lines += int8_card(int8, accuracy) if int8 else []
    lines += ["## Training recipe", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in cert["config"].items() if k != "seed"]
    lines += ["", f"All of {dataset}'s training images, seeds {', '.join(str(r['seed']) for r in cert['seeds'])}; "
              f"input normalised with mean {stats[0]} and std {stats[1]}.", ""]
    if cert["dataset"].get("md5"):
        lines += ["Data files (md5 of the uncompressed content):", ""]
        lines += [f"- {name}: {digest}" for name, digest in cert["dataset"]["md5"].items()] + [""]
    versions = cert.get("versions", {})
    lines += ["## Provenance", "", f"- code: {versions.get('code', 'unknown')}",
              f"- python {versions.get('python')}, torch {versions.get('torch')}, optuna {versions.get('optuna')}",
              f"- trained on: {cert.get('device')} ({versions.get('host', '')}, {versions.get('platform', '')}"
              f"{', ' + versions['cpu'] if versions.get('cpu') else ''})",
              f"- exported on: {platform.node()}, torch {torch.__version__}; code {provenance()['code']}",
              "- checkpoints (sha256): " + ", ".join(f"seed {r['seed']} {r['checkpoint_sha256']}"
                                                     for r in cert["seeds"]),
              ""]
    return "\n".join(lines + _card_reproduce(cert, dataset))
