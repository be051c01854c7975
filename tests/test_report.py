import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from browser import screenshot
from eval import report
from s3server import BUCKET, s3_endpoint  # noqa: F401  (fixture)
from trainer.store import open_store

RUN = "demo"
STEPS = (320, 640, 960)
IMAGES_PER_STEP = 64
SETTINGS = {"sampler": "ddim", "steps": 32, "guidance": 1.0, "seed": 0, "ema": "power-0.100", "fid_mode": "legacy"}
REFERENCE = {"path": "/refs/demo.npz", "id": "0123456789abcdef", "n": 96, "extractor": "random-inception-seed0/legacy",
             "resolution": 16}


def result(step, metric, kind, value, stderr=None, unit="", **extra):
    return {"run": RUN, "step": step, "images_seen": step * IMAGES_PER_STEP, "metric": metric, "kind": kind,
            "status": "ok", "value": value, "stderr": stderr, "n": 500, "unit": unit, "warnings": [],
            "settings": SETTINGS, "reference": REFERENCE, "code_version": "0.1.0", "worker": "host-1-ab12",
            "time": f"2026-12-01T12:{step // 100:02d}:00Z", **extra}


def gradient_png(size: int, hue: int) -> bytes:
    """A visibly non-blank grid: a colour gradient."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), hue, np.uint8)],
                   axis=-1)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def put(store, step, metric, payload):
    """A result at its key; bytes are stored as they are (a result cut short by a crash)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    store.put(f"{RUN}/evals/{step:09d}/{metric}.json", data)


@pytest.fixture
def run_store(tmp_path):
    """A run with results at three steps, a sweep, a bad checkpoint, an unparsable result, a lease and two grids."""
    store = open_store(str(tmp_path / "store"))
    for i, step in enumerate(STEPS):
        put(store, step, "fid_random_inception500", result(step, "fid_random_inception500", "fid", 80.0 - 20 * i,
                                                            warnings=["n=500 < 50000: FID is biased upward"]))
        put(store, step, "is_random_inception500",
            result(step, "is_random_inception500", "is", 1.5 + 0.2 * i, stderr=0.05))
        put(store, step, "bpd", result(step, "bpd", "bpd", 5.0 - 0.5 * i, stderr=0.02, unit="bits/dim"))
    curve = [{"sigma_rel": s, "value": v} for s, v in [(0.05, 44.0), (0.10, 39.5), (0.15, 41.0), (0.20, 46.0)]]
    put(store, 960, "fid_sweep_random_inception500",
        result(960, "fid_sweep_random_inception500", "fid_sweep", 39.5, curve=curve,
               best={"sigma_rel": 0.10, "value": 39.5}))
    put(store, 1280, "fid_random_inception500",
        {**result(1280, "fid_random_inception500", "fid", None), "status": "bad_checkpoint",
         "error": "ema-power-0.100.safetensors: sha256 does not match the manifest <b>"})
    put(store, 1280, "bpd", b'{"step": 1280, "metric": "bpd", "val')
    store.put(f"{RUN}/evals/000001280/is_random_inception500.lease", b'{"worker": "w", "expires": 0}')
    store.put(f"{RUN}/samples/000000320.png", gradient_png(64, 40))
    store.put(f"{RUN}/samples/000000960.png", gradient_png(64, 220))
    return store


def test_report_lists_every_result_and_the_unreadable_one(run_store):
    key = report.write(run_store, RUN)
    html = report.build(run_store, RUN)
    assert key == f"{RUN}/report/index.html"
    assert re.sub(r"generated \S+", "", run_store.get(key).decode()) == re.sub(r"generated \S+", "", html)
    rows = re.findall(r"<tr>(.*?)</tr>", html)[1:]
    assert len(rows) == 3 * 3 + 1 + 1  # three metrics at three steps, the sweep, the bad checkpoint
    assert "bad_checkpoint: ema-power-0.100.safetensors: sha256 does not match the manifest &lt;b&gt;" in html
    assert "<b>" not in html  # result strings are escaped
    assert "Unreadable results" in html and f"{RUN}/evals/000001280/bpd.json" in html and ".lease" not in html
    assert f"store {run_store.uri}" in html and "11 results, 1 unreadable" in html
    assert "n=500 &lt; 50000: FID is biased upward" in html
    # the metric's own name labels the plots (the SVG keeps each drawn label as a comment beside its paths): the
    # random-Inception distance is never called FID
    assert "Fréchet distances: fid_random_inception500</figcaption>" in html
    assert html.count("<!-- fid_random_inception500 -->") == 2 and "<!-- FID -->" not in html  # axis and legend
    assert "bpd (bits/dim)" in html and "fid_sweep_random_inception500 against sigma_rel at step 960" in html
    assert html.count("<svg") == 4
    assert "ddim" in rows[0] and "0123456789abcdef" in rows[0] and "host-1-ab12" in rows[0]


def test_report_is_self_contained(run_store):
    html = report.build(run_store, RUN)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"<script|<link|@import|url\((?!#)", html, re.IGNORECASE)  # url(#id): within the page
    # the SVGs are inline and draw their text as paths: no fonts to fetch, no <text> elements
    assert "<text" not in html and "font-face" not in html
    grids = re.findall(r'<img alt="samples at step (\d+)" src="data:image/png;base64,([^"]+)"', html)
    assert [int(step) for step, _ in grids] == [960, 320]  # newest first
    assert base64.b64decode(grids[0][1]) == run_store.get(f"{RUN}/samples/000000960.png")


def test_a_run_without_results_gets_a_page_saying_so(tmp_path):
    store = open_store(str(tmp_path))
    store.put(f"{RUN}/samples/000000064.png", gradient_png(16, 0))
    html = report.build(store, RUN)
    assert "No evaluation results yet." in html and "No completed results to plot yet." in html
    assert "0 results" in html and 'alt="samples at step 64"' in html
    assert "No sample grids yet." in report.build(store, "other")


def test_report_on_s3_is_served_as_a_page(s3_endpoint):
    store = open_store(f"s3://{BUCKET}/report", endpoint_url=s3_endpoint)
    put(store, 320, "bpd", result(320, "bpd", "bpd", 5.0, stderr=0.02, unit="bits/dim"))
    key = report.write(store, RUN)
    head = store.client.head_object(Bucket=BUCKET, Key=f"report/{key}")
    assert head["ContentType"] == "text/html; charset=utf-8"  # a browser shows it rather than downloading it
    assert "bpd (bits/dim)" in store.get(key).decode() and f"store s3://{BUCKET}/report" in store.get(key).decode()


def test_results_that_are_not_ok_stay_out_of_the_plots():
    ok = [result(step, "fid50k", "fid", 10.0 - step / 100) for step in STEPS]
    bad = {**result(1280, "fid50k", "fid", 999.0), "status": "error", "error": "sampling diverged"}
    assert report._family_plot([*ok, bad], "fid") == report._family_plot(ok, "fid")
    assert report._family_plot([bad], "fid") is None


def test_unreadable_check_rejects_results_it_cannot_plot():
    assert report._problem([1, 2]) == "not a JSON object"
    assert "'images_seen'" in report._problem({**result(1, "fid", "fid", 1.0), "images_seen": None})
    sweep = result(1, "fid_sweep", "fid_sweep", 1.0, curve=[{"sigma_rel": 0.1}], best={"sigma_rel": 0.1, "value": 1})
    assert "fid_sweep" in report._problem(sweep)
    assert report._problem({**result(1, "fid", "fid", None), "status": "error", "error": "boom"}) is None


def drawn(png, plot_box) -> bool:
    """True when a screenshot shows a page with content: many colours overall, and ink inside the first plot's box."""
    image = np.asarray(Image.open(png).convert("RGB"))
    colours = len(np.unique(image.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)))
    region = image[plot_box[1]:plot_box[3], plot_box[0]:plot_box[2]].reshape(-1, 3)
    ink = (np.abs(region.astype(int) - image[0, 0].astype(int)).sum(axis=1) > 60).mean()
    return colours > 1000 and ink > 0.02


# The first plot of a 1280-wide window: left half, under the header and the "Metrics" heading.
FIRST_PLOT = (30, 160, 620, 500)


@pytest.mark.slow
def test_report_draws_its_plots_in_a_headless_browser(run_store, tmp_path):
    page = tmp_path / "index.html"
    page.write_text(report.build(run_store, RUN), encoding="utf-8")
    assert drawn(screenshot(page, tmp_path / "report.png"), FIRST_PLOT)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body><h1>demo</h1></body></html>", encoding="utf-8")
    assert not drawn(screenshot(blank, tmp_path / "blank.png"), FIRST_PLOT)  # the check fails on an empty page
