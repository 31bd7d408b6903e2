"""`best` certifies a winner on the test set; `report` renders the study to an offline page."""

import json
import re
import shutil

import optuna
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from search.provenance import cpu_identity
from search.record import candidates, pareto_front
from search.report import collect, trial_rows, write_report
from search.retrain import CheckpointError, load_checkpoint, read_front
from search.engine import evaluate, to_device
from search.options import SearchOptions
from search.study import run_search

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, data_root):
    """Two trained trials; a budget of 6,000 rejects the baseline and small presets, so 'tiny' trains first."""
    results = tmp_path_factory.mktemp("results")
    opts = SearchOptions(trials=2, study="tiny", results_dir=str(results), epochs=1, max_params=6_000,
                         subset=2_000, data_dir=str(data_root), device="cpu")
    result = run_search(opts, log=lambda line: None)
    return results, result.study


def test_best_writes_best_json_and_a_checkpoint_that_reproduces_it(tiny_study, data_root, mnist):
    results, study = tiny_study
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--seeds", "1",
                              "--data-dir", str(data_root), "--device", "cpu", "--max-params", "6000"])
    assert out.exit_code in (0, 1), out.output
    best = json.loads((results / "tiny" / "best.json").read_text())
    assert best["study"] == "tiny" and best["n_params"] < 6_000 and best["config"]["epochs"] == 1
    assert len(best["seeds"]) == 1 and len(best["seeds"][0]["epochs"]) == 1
    epoch = best["seeds"][0]["epochs"][0]
    assert set(epoch) >= {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert best["final_test_acc_mean"] == best["seeds"][0]["final_test_acc"] > 0.5
    # The exercise's four rules, then the tighter budget asked for, marked as not one of them.
    assert [r["rule"] for r in best["rules"]][:3] == ["fewer than 20,000 parameters", "no fully connected layer",
                                                      "at most 20 epochs"]
    assert best["rules"][4]["rule"] == "fewer than 6,000 parameters (the budget asked for, not one of the exercise's rules)"
    assert len(best["rules"]) == 5 and best["max_params"] == 6_000
    assert best["rules"][0]["pass"] and best["rules"][1]["pass"] and best["rules"][2]["pass"] and best["rules"][4]["pass"]
    accuracy_pass = best["final_test_acc_mean"] >= 0.994
    assert best["rules"][3]["pass"] == accuracy_pass and out.exit_code == (0 if accuracy_pass else 1)
    assert ("PASS" in out.output) and ("FAIL" in out.output) == (not accuracy_pass)
    assert best["versions"]["torch"] == torch.__version__
    assert best["versions"]["cpu"] == cpu_identity()  # the CPU model, to family and stepping (search/provenance.py)

    module, payload = load_checkpoint(best["seeds"][0]["checkpoint"])
    test = load_full_test(data_root)
    # Evaluated as the engine evaluates on this CPU: channels_last, 500 images a batch, in the certificate's
    # precision; any other way may move a borderline image in bfloat16.
    module = module.to(memory_format=torch.channels_last)
    _, acc = evaluate(module, *to_device(test, torch.device("cpu")), batch_size=500, channels_last=True,
                      bf16=best["seeds"][0]["precision"] == "bf16")
    assert acc == best["seeds"][0]["final_test_acc"]
    assert payload["test_acc"] == best["seeds"][0]["final_test_acc"]


def load_full_test(data_root):
    from search.data import load_data

    return load_data(data_root, with_test=True).test


def test_foreign_and_tampered_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "budgetnas-checkpoint-1", "x": Evil()}, foreign)
    with pytest.raises(CheckpointError, match="refused, not a plain weights file"):
        load_checkpoint(foreign)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a budgetnas checkpoint"):
        load_checkpoint(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


def test_best_on_a_missing_study_says_so(tmp_path, data_root):
    out = runner.invoke(app, ["best", "--study", "nope", "--results-dir", str(tmp_path), "--data-dir", str(data_root)])
    assert out.exit_code == 2 and "no study 'nope'" in out.output




def test_report_data_and_page(tiny_study):
    results, study = tiny_study
    data = collect(study)
    assert data.n_trained == 2 and data.counts["rejected"] >= 2  # the presets over 6,000, and any sampled
    assert data.best["n_params"] < 6_000 and data.winner_layers[0]["name"] == "b1.conv1"
    assert len(data.frame) == len(study.get_trials())
    out = runner.invoke(app, ["report", "--study", "tiny", "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    page = (results / "tiny" / "report.html").read_text()
    # Plotly's library is inside the page (its own code names a map-data URL it never fetches here); no script or
    # stylesheet comes from elsewhere.
    assert "plotly.js v" in page.lower() and page.count("<script") >= 2
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']?(https?:)?//", page, re.I)
    rows = trial_rows(data.frame)
    assert len(rows) == len(study.get_trials())
    trained = [r for r in rows if r["outcome"] in ("completed", "pruned")]
    assert len(trained) == 2 and all("." not in r["parameters"] and "." not in r["epochs trained"] for r in trained)
    assert all(len(r["validation accuracy (%)"].split(".")[1]) == 2 for r in trained)
    # Where each candidate came from: the enqueued presets by name, evolution children by parent and change, the
    # rest from the sampler.
    def origin(t):
        if "preset" in t.user_attrs:
            return f"preset {t.user_attrs['preset']}"
        if "parent" in t.user_attrs:
            return f"trial {t.user_attrs['parent']}, {t.user_attrs['mutation']}"
        return "sampler"

    assert [r["from"] for r in rows] == [origin(t) for t in study.get_trials()]
    assert any(r["from"].startswith("preset ") for r in rows)
    assert {r["parameters"] for r in trained} <= {f"{t.user_attrs['n_params']:,}" for t in study.get_trials()}
    for fig_id in ("params-vs-accuracy", "parameter-spread", "learning-curves", "history", "timeline", "winner",
                   "trial-table"):
        assert f'id="{fig_id}"' in page or f"id='{fig_id}'" in page, fig_id


def test_pareto_front():
    from optuna.trial import create_trial

    from search.record import TrialRecord

    def point(n, acc, params, activation_bytes):
        trial = create_trial(values=[acc, float(params)],
                             user_attrs={"n_params": params, "activation_bytes": activation_bytes})
        trial.number = n
        return TrialRecord(trial)

    points = [point(n, acc, p, a) for n, acc, p, a in
              [(0, 0.99, 5000, 2000), (1, 0.98, 6000, 1500), (2, 0.995, 9000, 2400), (3, 0.97, 3000, 2200),
               (4, 0.99, 5000, 2000), (5, 0.995, 9500, 2300)]]
    # Smallest first; 1 is dominated by 0, 5 by 2, and 4 ties 0 (one of them stands for that point).
    assert [r.number for r in pareto_front(points)] == [3, 0, 2]
    # Against peak activation memory: 1 is now the smallest, 3 is dominated by 0, and 5 dominates 2.
    assert [r.number for r in pareto_front(points, "activation-bytes")] == [1, 0, 5]


def test_report_of_an_empty_study_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path / 'e.db'}"
    study = optuna.create_study(study_name="e", storage=storage)
    path = write_report(study, str(tmp_path))
    assert "This study has 0 trained trial(s)" in path.read_text()


@pytest.mark.browser
def test_report_opens_in_headless_chromium_offline_with_every_figure_drawn(tiny_study, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    from playwright.sync_api import sync_playwright

    results, study = tiny_study
    path = write_report(study, str(results))
    html_text = path.read_text()
    # No script or stylesheet from the network: the page is one offline file.
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']?(https?:)?//", html_text, re.I)
    errors, outside = [], []

    def only_files(route):  # every request that is not the file itself is aborted and counted
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", only_files)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("#params-vs-accuracy .main-svg")
        traces = page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot')).map(e => [e.id, "
                               "(e.data || []).length, e.querySelectorAll('.main-svg').length])")
        n_sections = page.evaluate("document.querySelectorAll('section.figure').length")
        failed = page.evaluate("Array.from(document.querySelectorAll('.note.error')).map(e => e.textContent)")
        page.click("#trial-table th:nth-child(3)")  # sort by validation accuracy
        shot = results / "tiny" / "report.png"
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert errors == [] and outside == [] and failed == []
    assert len(traces) == n_sections >= 4  # every figure section drew its plot
    empty = [fig_id for fig_id, n_data, n_svg in traces if not (n_data > 0 and n_svg > 0)]
    assert empty == [], traces  # each figure holds real traces
    assert shot.stat().st_size > 10_000


def test_a_figure_that_fails_is_an_error_note_not_a_figure(tiny_study, monkeypatch):
    from optuna import visualization

    results, study = tiny_study
    monkeypatch.setattr(visualization, "plot_timeline", lambda study: 1 / 0)
    page = write_report(study, str(results)).read_text()
    assert '<section id="timeline"><h2>Timeline of trials</h2><p class="note error">could not be drawn: ' \
           "ZeroDivisionError" in page


def test_best_front_certifies_every_front_trial_once_and_the_report_draws_them(tiny_study, data_root, capsys):
    results, study = tiny_study
    args = ["best", "--study", "tiny", "--results-dir", str(results), "--front", "--floor", "10", "--seeds", "1",
            "--data-dir", str(data_root), "--device", "cpu", "--max-params", "6000"]
    front = pareto_front(candidates(study))
    assert front  # the fixture's two 1-epoch trials completed
    # `best` certified the winner before (same network, recipe, seeds and budget): its certificate is reused.
    before = {r.number: (results / "certified" / f"tiny-trial-{r.number}" / "certificate.json").exists() for r in front}
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    summary = json.loads((results / "tiny" / "front.json").read_text())
    assert [e["trial"] for e in summary["entries"]] == [r.number for r in front]
    assert summary["floor"] == 0.10 and summary["seeds"] == 1
    for entry, record in zip(summary["entries"], front):
        cert = json.loads((results / "certified" / f"tiny-trial-{record.number}" / "certificate.json").read_text())
        assert entry["n_params"] == record.n_params == cert["n_params"] and entry["val_acc"] == record.values[0]
        # Every size figure, as the search stored it, so that a study bounded by another metric can list its own.
        assert [entry[k] for k in ("macs", "activation_bytes", "model_bytes")] == [
            record.macs, record.activation_bytes, record.model_bytes] and record.activation_bytes > 784
        assert entry["test_acc_mean"] == cert["final_test_acc_mean"] > 0.5 and entry["reused"] == before[record.number]
        assert (results / "certified" / f"tiny-trial-{record.number}" / "seed0.pt").is_file()
    # Again: every certificate is reused, nothing retrained.
    out = runner.invoke(app, args)
    assert out.exit_code == 0 and out.output.count("its certificate is reused") == len(front), out.output
    assert "seed 1/1: epoch 1/1" not in out.output
    assert all(e["reused"] for e in json.loads((results / "tiny" / "front.json").read_text())["entries"])
    # A floor no trial reached: refused, naming the floor and the best; front.json kept.
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--front", "--floor", "99.99",
                              "--data-dir", str(data_root)])
    assert out.exit_code == 2 and "floor of 99.99%" in out.output, out.output
    assert (results / "tiny" / "front.json").is_file()
    # No --floor: the study's target (MNIST's 99.4%) minus 0.4, as the search's floor.
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--front",
                              "--data-dir", str(data_root)])
    assert out.exit_code == 2 and "floor of 99.00%" in out.output, out.output
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--front", "--trial", "1"])
    assert out.exit_code == 2 and "--front" in out.output

    out = runner.invoke(app, ["report", "--study", "tiny", "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    page = (results / "tiny" / "report.html").read_text()
    assert "id='certified-front'" in page and "certified test accuracy (1 seed)" in page
    # A front.json written before it held the other size figures is still shown, its figures the certificates';
    # one whose figure was edited is not.
    path = results / "tiny" / "front.json"
    written = json.loads(path.read_text())
    legacy = {**written, "entries": [{k: v for k, v in e.items() if k not in ("macs", "activation_bytes",
                                                                            "model_bytes")}
                                     for e in written["entries"]]}
    del legacy["size_metric"]
    path.write_text(json.dumps(legacy))
    shown, problems = read_front(str(results), "tiny")
    assert problems == [] and shown["entries"] == written["entries"]
    edited = json.loads(json.dumps(written))
    edited["entries"][0]["activation_bytes"] -= 1
    path.write_text(json.dumps(edited))
    shown, problems = read_front(str(results), "tiny")
    assert len(shown["entries"]) == len(written["entries"]) - 1
    assert f"trial {written['entries'][0]['trial']}: activation_bytes: front.json says" in problems[0], problems
    path.write_text(json.dumps(written))
    # A study of another size metric: both tables list that figure beside the parameters.
    from search.console import print_front
    from search.report import _certified_front

    assert written["size_metric"] == "params"
    first = written["entries"][0]
    capsys.readouterr()
    print_front(written)
    assert "peak activation" not in capsys.readouterr().out
    by_bytes = {**written, "size_metric": "activation-bytes"}
    print_front(by_bytes)
    printed = capsys.readouterr().out
    assert "peak activation (B)" in printed and f"{first['activation_bytes']:,}" in printed
    assert "<th>peak activation (B)</th>" in _certified_front(by_bytes)
    assert f"<td>{first['activation_bytes']:,}</td>" in _certified_front(by_bytes)
    assert "peak activation" not in _certified_front(written)


def test_report_of_an_empty_study_says_so_without_figures(tmp_path):
    import optuna

    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    out = runner.invoke(app, ["report", "--study", "empty", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0 and "(0 trained, 0 rejected, 0 queued)" in out.output, out.output
    page = (tmp_path / "empty" / "report.html").read_text()
    assert "id='too-few'" in page and "0 trained trial(s)" in page
    assert "js-plotly-plot" not in page and 'id="params-vs-accuracy"' not in page


def _measure_only(model, train, val, cfg, *, data_on_device, **kwargs):
    """`fit` without training (the network's test accuracy as built), to certify again in seconds."""
    from search.engine.config import EpochRecord, History

    loss, acc = evaluate(model, data_on_device[2], data_on_device[3], bf16=False)
    return History([EpochRecord(1, 2.3, 0.1, loss, acc, 0.0, 1.0, 1.0)], status="completed", precision="fp32")


def test_a_forged_certificate_is_neither_reused_nor_reported(tiny_study, data_root, monkeypatch):
    results, study = tiny_study
    front = pareto_front(candidates(study))
    path = results / "certified" / f"tiny-trial-{front[0].number}" / "certificate.json"
    cert = json.loads(path.read_text())
    cert["seeds"][0]["final_test_acc"] = cert["final_test_acc_mean"] = 0.9952
    path.write_text(json.dumps(cert))
    monkeypatch.setattr("search.retrain.fit", _measure_only)
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--front", "--floor", "10",
                              "--seeds", "1", "--data-dir", str(data_root), "--device", "cpu", "--max-params", "6000"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0, out.output
    assert f"trial {front[0].number}: its certificate is not reused, its evidence does not bear it out" in text
    assert "seeds[0].final_test_acc: the certificate says 99.52%, but seed0.pt recorded" in text
    entry = json.loads((results / "tiny" / "front.json").read_text())["entries"][0]
    assert entry["test_acc_mean"] != 0.9952 and not entry["reused"]
    # best.json edited: the report leaves it out and says why. best.json is written afresh first: --front may just
    # have certified the winner again, replacing the checkpoint an earlier best.json names.
    out = runner.invoke(app, ["best", "--study", "tiny", "--results-dir", str(results), "--seeds", "1",
                              "--data-dir", str(data_root), "--device", "cpu", "--max-params", "6000"])
    assert out.exit_code in (0, 1), out.output
    best = json.loads((results / "tiny" / "best.json").read_text())
    best["rules"][3]["pass"] = best["certified"] = True
    (results / "tiny" / "best.json").write_text(json.dumps(best))
    out = runner.invoke(app, ["report", "--study", "tiny", "--results-dir", str(results)])
    text = " ".join(out.output.split())
    assert out.exit_code == 0 and "best.json is not shown: rules[3]: the certificate says" in text, out.output
    page = (results / "tiny" / "report.html").read_text()
    assert "id='certification'" not in page and "id='certified-front'" in page


def test_the_cpu_is_named_to_its_family_model_and_stepping_from_the_first_processor():
    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
            "stepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 25\nmodel name\t: AMD EPYC 9004\n")
    named = cpu_identity(info)
    assert named.startswith("AMD EPYC (family 26, model 2, stepping 1), ") and named.endswith(" threads")
    assert cpu_identity("").endswith(" threads")  # no /proc/cpuinfo: platform's name, or "unknown CPU"
