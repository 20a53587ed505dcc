"""The redundancy report: a complete, self-contained, escaped folder; clear errors on bad input;
and a real headless browser renders it (where Debian's chromium is installed)."""

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image

import probes
from analyses.evaluating.accuracy import accuracy_table, paired_table
from analyses.choosing.policies import freeze_plan
from analyses.reporting.report import FAR_MORE_POINTS, ReportInputs, check_claims, load_report_inputs, write_report
from eemllm_models import EfficiencyPlan, load_shapes_vqa

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "What <script>alert(1)</script> colour & shape?"


class _Page(HTMLParser):
    """Collects what the tests look at: tags, img sources, link targets and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(markup: str) -> _Page:
    page = _Page()
    page.feed(markup)
    page.close()
    return page


def _comparison(text_drop: float = 0.08, shortv_first: bool = True) -> pd.DataFrame:
    """A policy comparison frame as analyses.choosing.compare.compare_policies returns it (3 random seeds)."""
    rows = [{"policy": "original", "k": 0, "seed": 0, "flops_ratio": 1.0, "accuracy": 0.9}]
    for k in (2, 4, 6):
        ratio = 1 - 0.05 * k
        best, second = (0.9 - 0.005 * k, 0.9 - 0.01 * k)
        rows += [{"policy": "shortv", "k": k, "seed": 0, "flops_ratio": ratio,
                  "accuracy": best if shortv_first else second},
                 {"policy": "cosine", "k": k, "seed": 0, "flops_ratio": ratio,
                  "accuracy": second if shortv_first else best},
                 {"policy": "text", "k": k, "seed": 0, "flops_ratio": 1 - 0.01 * k, "accuracy": 0.9 - text_drop * k}]
        rows += [{"policy": "random", "k": k, "seed": s, "flops_ratio": ratio, "accuracy": 0.9 - 0.03 * k - 0.01 * s}
                 for s in range(3)]
    return pd.DataFrame(rows)


def _outcome_comparison(n: int, accuracy: dict[str, float], ks=(2, 4), seeds: int = 3) -> pd.DataFrame:
    """A comparison frame with per-question outcomes as compare_policies writes them: question i is right
    under a policy when its difficulty is below the policy's accuracy (so the policies' outcomes are nested)."""
    difficulty = np.random.default_rng(0).random(n)
    rows = []

    def row(policy, k, seed, target):
        right = difficulty < target
        rows.append({"policy": policy, "k": k, "seed": seed, "flops_ratio": 1 - 0.05 * k, "accuracy": right.mean(),
                     "n": n, "correct": int(right.sum()), "outcomes": "".join("+" if r else "-" for r in right)})

    row("original", 0, 0, accuracy["original"])
    for k in ks:
        for policy in ("shortv", "cosine", "text"):
            row(policy, k, 0, accuracy[policy] - 0.01 * k)
        for seed in range(seeds):
            row("random", k, seed, accuracy["random"] - 0.01 * k - 0.01 * seed)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def measured(default_model):
    """Real probe results of the default model: Layer Contribution and attention statistics on 4 prompts."""
    model, processor = default_model
    data = load_shapes_vqa("train", n=40)
    lc = probes.layer_contribution(model, processor, data, samples=4, progress=False)
    attention = probes.attention_statistics(model, processor, data, samples=4, progress=False)
    return lc, attention


def _modes(lc: xr.Dataset) -> xr.Dataset:
    """A mode_contribution-shaped result on lc's samples and layers."""
    visual = lc.lc.sel(group="visual", drop=True)
    values = xr.concat([visual, visual * 0.5, visual * 2.0], dim="mode").transpose("sample", "layer", "mode")
    return xr.Dataset({"contribution": values.assign_coords(mode=["frozen", "naavit", "composite"])},
                      attrs={**lc.attrs, "probe": "mode_contribution"})


@pytest.fixture(scope="module")
def report(measured, tmp_path_factory):
    """A full report written from a probe folder (as `eemllm probe`/`demo` leave it), with every optional input."""
    lc, attention = measured
    source = tmp_path_factory.mktemp("probes")
    probes.save_result(lc, source / "lc.nc")
    probes.save_result(attention, source / "attention.nc")
    probes.save_result(_modes(lc), source / "mode_contribution.nc")
    plan = freeze_plan(lc, 7, "shortv")
    plan.save(source / "plan.json")
    _comparison().to_csv(source / "comparison.csv", index=False)
    pd.DataFrame([{"variant": "original", "prefill_ms": 12.0, "prefill_ms_iqr": 1.0, "prefill_speedup": 1.0,
                   "prefill_speedup_low": 1.0, "prefill_speedup_high": 1.0, "noisy": False, "decode_speedup": 1.0,
                   "repeats": 20, "device": "cpu"},
                  {"variant": "pruned", "prefill_ms": 8.0, "prefill_ms_iqr": 3.0, "prefill_speedup": 1.5,
                   "prefill_speedup_low": 0.9, "prefill_speedup_high": 1.8, "noisy": True, "decode_speedup": 1.1,
                   "repeats": 20, "device": "cpu"}]).to_csv(source / "latency.csv", index=False)
    pd.DataFrame({"id": ["a", "b", "c"], "group": ["a", "b", "c"], "qtype": ["color", "exists", "color"],
                  "question": [HOSTILE, "Is there a | circle?\nYes?", "What colour?"],
                  "answer": ["red", "None", "blue"], "prediction": ["red", "no", "blue"],
                  "pruned_prediction": ["red", "yes", "red"], "correct": [True, False, True],
                  "pruned_correct": [True, False, False]}).to_csv(source / "demo_answers.csv", index=False)
    (source / "demo_summary.json").write_text(json.dumps({
        "accuracy": {"color": 0.9, "overall": 0.85}, "pruned_accuracy": {"color": 0.8, "overall": 0.8},
        "decoder_flops_ratio": 0.62, "evaluation": {"dataset": "shapes-vqa", "split": "test", "n": 3}}))
    out = tmp_path_factory.mktemp("reports") / "report"
    inputs = load_report_inputs(source)
    inputs.pruned_model = out / "pruned-model"
    return write_report(inputs, out), plan, lc


def test_report_folder_is_complete_self_contained_and_escaped(report):
    index, plan, lc = report
    out = index.parent
    figures = {"plan.png", "lc.png", "tradeoff.png", "modes.png", "attention.png"}
    expected = {"index.html", "report.md", "summary.json", "plan.json", "lc.nc", "attention.nc",
                "mode_contribution.nc", "comparison.csv", "latency.csv", "answers.csv", "figures",
                ".eemllm"}  # the marker that lets --overwrite replace this folder
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in (out / "figures").iterdir()} == figures
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    markup = index.read_text()
    page = _parse(markup)
    assert len(page.images) == len(figures) and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert "http://" not in markup and "https://" not in markup
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; colour &amp; shape?" in markup
    assert HOSTILE in "".join(page.text)
    assert "pruned-model/" in page.links, "the pruned model inside the report is linked relatively"
    for text in ("LC-chosen layers", "far more accuracy", "62% of original", "85.0% → 80.0%", "1.50×"):
        assert text in markup

    markdown = (out / "report.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; colour &amp; shape?" in markdown and "<script>" not in markdown
    assert "Is there a \\| circle? Yes?" in markdown
    for name in figures:
        assert f"(figures/{name})" in markdown
        with Image.open(out / "figures" / name) as image:
            assert len(image.convert("RGB").getcolors(1 << 20)) > 8, f"{name} looks blank"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoder_flops_ratio"] == 0.62
    assert summary["accuracy"] == {"original": 0.85, "pruned": 0.8}
    assert summary["latency"]["prefill_speedup"] == 1.5 and summary["latency"]["variant"] == "pruned"
    assert summary["plan"]["changed_layers"] == {"frozen": list(plan.layers("frozen"))}
    assert {c["verdict"] for c in summary["claims"].values()} == {"holds"}
    assert EfficiencyPlan.load(out / "plan.json").modes == plan.modes
    reopened = probes.open_result(out / "lc.nc", probe="layer_contribution")
    np.testing.assert_array_equal(reopened.lc.values, lc.lc.values)
    assert pd.read_csv(out / "answers.csv", keep_default_na=False).answer.tolist() == ["red", "None", "blue"]

    # Uncertainty: LC intervals in the data and the page, selection stability, accuracy with n, latency noise.
    assert reopened.lc_low.dims == ("layer", "group") and reopened.lc_low.attrs["interval_level"] == 0.95
    first = summary["lc"]["layers"][0]
    assert first["visual_low"] <= first["visual"] <= first["visual_high"] and summary["lc"]["samples"] == 4
    stability = summary["selection_stability"]
    assert [r["mode"] for r in stability] == ["frozen"] and stability[0]["k"] == 7
    assert set(stability[0]["layers"]) == {str(layer) for layer in plan.layers("frozen")}
    assert 0 <= stability[0]["same_set"] <= stability[0]["least"] <= 1 and stability[0]["lowest_by_mean"]
    intervals = summary["accuracy_intervals"]
    assert [r["qtype"] for r in intervals["original"]] == ["color", "exists", "overall"]
    assert intervals["original"][-1]["n"] == 3 and intervals["original"][0]["accuracy"] == 1.0
    paired = intervals["paired_difference"][-1]
    assert paired["difference"] == pytest.approx(-1 / 3) and paired["resolved"] is False
    assert summary["latency"]["noisy"] is True and summary["latency"]["prefill_speedup_low"] == 0.9
    for text in ("noisy: interval includes 1.0", "1.50× (noisy)", "among 7 lowest", "Selection stability",
                 "visual 95% interval", "McNemar", "not resolved at this n", "Wilson score"):
        assert text in markup and text in markdown, text


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium) to render the page")
def test_headless_chromium_renders_the_page(report, tmp_path):
    index = report[0]
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", index.as_uri()], check=True, timeout=120, capture_output=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    assert len(np.unique(packed)) > 200, "the screenshot has almost no colours: blank page?"
    assert (pixels.min(axis=2) < 200).mean() > 0.03, "the screenshot is nearly all white"

    dom = subprocess.run([*flags, "--dump-dom", index.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    page = _parse(dom)
    assert "script" not in page.tags, "dataset text became a script element"
    assert HOSTILE in "".join(page.text)
    assert page.tags.count("img") == 5 and "Redundancy report" in dom


def _minimal(lc: xr.Dataset, **extra) -> ReportInputs:
    return ReportInputs(lc=lc, plan=freeze_plan(lc, 3, "shortv"), **extra)


def test_existing_folder_is_refused_or_replaced_whole(measured, tmp_path):
    lc, _ = measured
    out = tmp_path / "report"
    write_report(_minimal(lc), out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report(_minimal(lc), out)
    (out / "pruned-model").mkdir()
    (out / "pruned-model" / "config.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    write_report(_minimal(lc, pruned_model=out / "pruned-model"), out, overwrite=True)
    assert (out / "pruned-model" / "config.json").read_text() == "{}", "the pruned model was not carried over"
    assert not (out / "stale.txt").exists()

    broken = _comparison().assign(flops_ratio="a lot")
    with pytest.raises(Exception):
        write_report(_minimal(lc, comparison=broken), out, overwrite=True)
    assert (out / "index.html").is_file() and (out / "pruned-model").is_dir(), "a failed write harmed the old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"], "temporary folders left behind"
    with pytest.raises(FileExistsError, match="not a folder"):
        write_report(_minimal(lc), out / "index.html", overwrite=True)


def test_incomplete_probe_files_name_the_file_and_the_fix(measured, tmp_path):
    lc, attention = measured
    folder = tmp_path / "probes"
    with pytest.raises(FileNotFoundError, match="eemllm probe"):
        load_report_inputs(folder)
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lc\.nc.*eemllm probe --probes lc"):
        load_report_inputs(folder)
    probes.save_result(lc, folder / "lc.nc")
    with pytest.raises(FileNotFoundError, match="eemllm plan"):
        load_report_inputs(folder)
    freeze_plan(lc, 3, "shortv").save(folder / "plan.json")

    cases = {"no 'lc' variable": lc.drop_vars("lc"),
             "dims": lc.sel(group="visual"),
             "NaN": lc.assign(lc=lc.lc.where(lc.layer != 2))}
    for message, broken in cases.items():
        probes.save_result(broken, folder / "lc.nc")
        with pytest.raises(ValueError, match=rf"lc\.nc.*{message}.*eemllm probe --probes lc"):
            load_report_inputs(folder)
    probes.save_result(lc, folder / "lc.nc")
    whole = (folder / "lc.nc").read_bytes()
    (folder / "lc.nc").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"lc\.nc.*half-written or corrupt.*eemllm probe --probes lc"):
        load_report_inputs(folder)
    probes.save_result(lc, folder / "lc.nc")
    probes.save_result(attention.drop_vars("entropy"), folder / "attention.nc")
    with pytest.raises(ValueError, match=r"attention\.nc.*'entropy'.*eemllm probe --probes attention"):
        load_report_inputs(folder)
    (folder / "attention.nc").unlink()

    inputs = load_report_inputs(folder)
    with pytest.raises(ValueError, match="holds this report's inputs"):
        write_report(inputs, folder, overwrite=True)
    with pytest.raises(ValueError, match="12 decoder layers"):
        ReportInputs(lc=lc, plan=EfficiencyPlan.empty(5))
    with pytest.raises(ValueError, match="original"):
        _minimal(lc, scores={"pruned": {"overall": 0.5}})


def test_accuracy_tables_give_n_and_textbook_intervals():
    frame = pd.DataFrame({"qtype": ["a"] * 10 + ["b"] * 4, "correct": [1] * 8 + [0] * 2 + [1, 1, 0, 1],
                          "pruned_correct": [1] * 6 + [0] * 4 + [1, 1, 0, 0]})
    table = accuracy_table(frame)
    assert table.qtype.tolist() == ["a", "b", "overall"] and table.n.tolist() == [10, 4, 14]
    assert (table.low[0], table.high[0]) == pytest.approx((0.4902, 0.9433), abs=5e-5)  # Wilson, 8 of 10
    paired = paired_table(frame)
    overall = paired.iloc[-1]
    assert overall.difference == pytest.approx(-3 / 14) and (overall.only_original, overall.only_pruned) == (3, 0)
    assert overall.mcnemar_p == pytest.approx(0.25) and overall.low < overall.difference < overall.high
    graded = frame.assign(score=[0.5] * 14)
    assert accuracy_table(graded).method.iloc[0] == "percentile bootstrap over questions"
    assert accuracy_table(graded).low.iloc[-1] == 0.5  # a constant score has a point interval
    with pytest.raises(ValueError, match="pruned_correct"):
        paired_table(frame.drop(columns="pruned_correct"))


def test_claims_verdicts_use_the_intervals(tmp_path):
    clear = {"original": 0.97, "shortv": 0.95, "cosine": 0.85, "random": 0.70, "text": 0.40}
    claims = check_claims(_outcome_comparison(400, clear))
    _outcome_comparison(400, clear).to_csv(tmp_path / "comparison.csv", index=False)
    assert check_claims(pd.read_csv(tmp_path / "comparison.csv")) == claims  # the outcomes survive the CSV
    assert claims["policy_order"]["verdict"] == "holds" and claims["text_vs_visual"]["verdict"] == "holds"
    assert claims["policy_order"]["evidence"] == "paired bootstrap over questions"
    assert claims["policy_order"]["n"] == 400
    first = claims["policy_order"]["per_k"][0]
    assert 0 < first["lc_minus_cosine"]["low"] < first["lc_minus_cosine"]["difference"] == pytest.approx(0.1, abs=0.03)
    margin = claims["text_vs_visual"]["margin"]
    assert FAR_MORE_POINTS < margin["low"] < margin["difference"] < margin["high"]

    # The same accuracies on 20 questions cannot separate LC from cosine: not resolved at this n.
    small = check_claims(_outcome_comparison(20, {**clear, "cosine": 0.90, "random": 0.88}))
    assert small["policy_order"]["verdict"] == "not resolved at this n"
    assert "not resolved at this n" in small["policy_order"]["statement"]
    assert "[" in small["policy_order"]["statement"]  # the interval is stated
    close_text = check_claims(_outcome_comparison(20, {**clear, "text": 0.88}))
    assert close_text["text_vs_visual"]["verdict"] == "not resolved at this n"

    # Cosine clearly above LC: does not hold; one k clear and one failing: partly holds.
    reversed_order = check_claims(_outcome_comparison(400, {**clear, "shortv": 0.75}))
    assert reversed_order["policy_order"]["verdict"] == "does not hold"
    mixed = pd.concat([_outcome_comparison(400, clear, ks=(2,)).query("policy != 'original'"),
                       _outcome_comparison(400, {**clear, "shortv": 0.75}, ks=(4,))])
    assert check_claims(mixed)["policy_order"]["verdict"] == "partly holds"
    no_drop = check_claims(_outcome_comparison(400, {**clear, "text": 0.93}))
    assert no_drop["text_vs_visual"]["verdict"] == "does not hold"

    # Only n (no per-question outcomes): independent (Newcombe) intervals.
    counts = check_claims(_outcome_comparison(400, clear).drop(columns="outcomes"))
    assert counts["policy_order"]["evidence"].startswith("Newcombe")
    assert counts["policy_order"]["verdict"] == "holds" and counts["text_vs_visual"]["verdict"] == "holds"
    assert check_claims(_outcome_comparison(20, {**clear, "cosine": 0.90}).drop(columns="outcomes"))[
        "policy_order"]["verdict"] == "not resolved at this n"


def test_claims_are_decided_from_the_measurements():
    """A comparison without n (written before intervals) is judged on point estimates and says so."""
    claims = check_claims(_comparison())
    assert claims["policy_order"]["verdict"] == "holds" and claims["text_vs_visual"]["verdict"] == "holds"
    assert claims["text_vs_visual"]["text_drop"] == pytest.approx(0.32)
    assert "point estimates" in claims["policy_order"]["statement"] and claims["policy_order"]["evidence"] == (
        "point estimates (the comparison has no n, so no interval)")

    reversed_order = check_claims(_comparison(text_drop=0.004, shortv_first=False))
    assert reversed_order["policy_order"]["verdict"] == "does not hold"
    assert "k=2: LC 88.0%, cosine 89.0%, random 83.0%" in reversed_order["policy_order"]["statement"]
    assert reversed_order["text_vs_visual"]["verdict"] == "does not hold"

    partly = _comparison()
    partly.loc[(partly.policy == "random") & (partly.k == 4), "accuracy"] = 0.99
    assert check_claims(partly)["policy_order"]["verdict"] == "partly holds"

    without_original = _comparison().query("policy != 'original'")
    assert check_claims(without_original)["text_vs_visual"]["verdict"] == "not measured"
    assert check_claims(without_original, original_accuracy=0.9)["text_vs_visual"]["verdict"] == "holds"
    assert check_claims(None)["policy_order"]["verdict"] == "not measured"
    assert check_claims(_comparison().query("policy != 'cosine'"))["policy_order"]["verdict"] == "not measured"


def test_every_accuracy_says_its_split_and_number_of_questions(report):
    index, _, _ = report
    markdown = (index.parent / "report.md").read_text()
    assert "Scored on 3 questions of shapes-vqa test split; no choice of the plan saw them." in markdown
    assert "| group |" not in markdown  # a per-question group column that repeats the id is not shown


def test_report_of_a_planned_models_attention_accepts_frozen_layers_without_visual_queries(default_model, tmp_path):
    model, processor = default_model
    data = load_shapes_vqa("train", n=8)
    plan = EfficiencyPlan.from_layers(12, range(6, 12), "frozen")
    with plan.applied(model):
        lc = probes.layer_contribution(model, processor, data, samples=4, progress=False)
        attention = probes.attention_statistics(model, processor, data, samples=4, progress=False)
    assert np.isnan(attention.visual_to_visual.sel(layer=7)).all()
    index = write_report(ReportInputs(lc=lc, plan=plan, attention=attention), tmp_path / "report")
    assert "attention.png" in (index.parent / "report.md").read_text()


def test_identical_layer_choices_are_a_tie_that_satisfies_at_least():
    """LC and cosine answering every question alike is LC ≥ cosine, not "not resolved"."""
    tied = {"original": 0.95, "shortv": 0.9, "cosine": 0.9, "random": 0.6, "text": 0.3}
    claims = check_claims(_outcome_comparison(400, tied))
    assert all(r["lc_minus_cosine"]["low"] == r["lc_minus_cosine"]["high"] == 0 for r in claims["policy_order"]["per_k"])
    assert claims["policy_order"]["verdict"] == "holds"


def _methods() -> pd.DataFrame:
    """A methods frame as analyses.choosing.methods.method_table returns it (original first)."""
    common = {"target": 0.5, "n": 28, "noisy": False}
    return pd.DataFrame([
        {"method": "original", "plan": "nothing", "flops_ratio": 1.0, "accuracy": 0.9, "accuracy_low": 0.8,
         "accuracy_high": 0.95, "difference": float("nan"), "difference_low": float("nan"),
         "difference_high": float("nan"), "prefill_speedup": 1.0, "ideal_prefill_speedup": 1.0, "decode_speedup": 1.0,
         "kv_cache_bytes": 2e6, **common},
        {"method": "shortv", "plan": "frozen [3, 4]", "flops_ratio": 0.5, "accuracy": 0.85, "accuracy_low": 0.7,
         "accuracy_high": 0.93, "difference": -0.05, "difference_low": -0.12, "difference_high": 0.01,
         "prefill_speedup": 1.6, "ideal_prefill_speedup": 2.0, "decode_speedup": 1.0, "kv_cache_bytes": 2e6, **common},
        {"method": "vtw", "plan": "keep 0 from layer 5", "flops_ratio": 0.49, "accuracy": 0.7, "accuracy_low": 0.5,
         "accuracy_high": 0.8, "difference": -0.2, "difference_low": -0.3, "difference_high": -0.1,
         "prefill_speedup": 1.9, "ideal_prefill_speedup": 2.04, "decode_speedup": 1.2, "kv_cache_bytes": 1e6,
         **common}])


def test_methods_at_equal_flops_get_their_section_with_verdicts(measured, tmp_path):
    lc, _ = measured
    with pytest.raises(ValueError, match=r"lacks columns \['target'\].*method_table"):
        _minimal(lc, methods=_methods().drop(columns="target"))
    latency = pd.DataFrame([{"variant": v, "prefill_ms": ms, "prefill_speedup": s} for v, ms, s in
                            (("original", 10.0, 1.0), ("pruned", 8.0, 1.25), ("shortv", 5.0, 2.0))])
    inputs = ReportInputs(lc=lc, plan=freeze_plan(lc, 7, "shortv"), methods=_methods(), latency=latency)
    index = write_report(inputs, tmp_path / "report")
    text = index.read_text()
    assert "Layer-level vs token-level redundancy at equal FLOPs" in text and "50% of the original" in text
    assert "not resolved at this n" in text and "1.90× (2.04×)" in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["latency"]["variant"] == "pruned", "the plan's own row, not the method that shares its policy"
    assert [m["method"] for m in summary["methods"]] == ["original", "shortv", "vtw"]
    assert summary["methods"][0]["difference"] is None
    reread = load_report_inputs(_probe_folder(lc, tmp_path / "probes", methods=_methods()))
    assert list(reread.methods.method) == ["original", "shortv", "vtw"]


def _probe_folder(lc: xr.Dataset, folder, methods: pd.DataFrame):
    folder.mkdir()
    probes.save_result(lc, folder / "lc.nc")
    freeze_plan(lc, 3, "shortv").save(folder / "plan.json")
    methods.to_csv(folder / "methods.csv", index=False)
    return folder
