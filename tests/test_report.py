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
from analyses.policies import freeze_plan
from analyses.report import ReportInputs, check_claims, load_report_inputs, write_report
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
    """A policy comparison frame as analyses.compare.compare_policies returns it (3 random seeds)."""
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
    pd.DataFrame([{"variant": "original", "prefill_ms": 12.0, "prefill_speedup": 1.0, "decode_speedup": 1.0,
                   "repeats": 20, "device": "cpu"},
                  {"variant": "pruned", "prefill_ms": 8.0, "prefill_speedup": 1.5, "decode_speedup": 1.1,
                   "repeats": 20, "device": "cpu"}]).to_csv(source / "latency.csv", index=False)
    pd.DataFrame({"id": ["a", "b"], "qtype": ["color", "exists"], "question": [HOSTILE, "Is there a | circle?\nYes?"],
                  "answer": ["red", "None"], "prediction": ["red", "no"], "pruned_prediction": ["red", "yes"]}
                 ).to_csv(source / "demo_answers.csv", index=False)
    (source / "demo_summary.json").write_text(json.dumps({
        "accuracy": {"color": 0.9, "overall": 0.85}, "pruned_accuracy": {"color": 0.8, "overall": 0.8},
        "decoder_flops_ratio": 0.62}))
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
    assert pd.read_csv(out / "answers.csv", keep_default_na=False).answer.tolist() == ["red", "None"]


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


def test_claims_are_decided_from_the_measurements():
    claims = check_claims(_comparison())
    assert claims["policy_order"]["verdict"] == "holds" and claims["text_vs_visual"]["verdict"] == "holds"
    assert claims["text_vs_visual"]["text_drop"] == pytest.approx(0.32)

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
