"""The HTML report: numbers, galleries, captions, histogram and index page (no model needed)."""

import re

import numpy as np

from mhpc.report import sig3, split_galleries, write_run_report, write_summary_report


def test_three_significant_digits():
    assert [sig3(v) for v in (1, 0.8, 0.9066, 0.99996, 19.74, 1233.9, 0.0, 123.45, 2e-6)] == [
        "1.00", "0.800", "0.907", "1.00", "19.7", "1230", "0.00", "123", "2.00e-06"]


def test_best_and_worst_defect_galleries_never_share_an_image():
    labels = [1] * 6 + [0] * 4
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    best, worst, good = split_galleries(labels, scores, per_group=4)
    assert best == [0, 1, 2] and worst == [5, 4, 3] and good == [6, 7, 8, 9]
    best, worst, _ = split_galleries([1] * 10, list(range(10)), per_group=4)
    assert best == [9, 8, 7, 6] and worst == [0, 1, 2, 3]  # enough defects: four each, still disjoint
    assert split_galleries([1, 0], [1.0, 0.5], 4)[:2] == ([0], [])


def test_run_report_has_histogram_threshold_colour_bar_and_good_defect_captions(tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    labels = np.array([1] * 6 + [0] * 4)
    scores = np.concatenate([rng.uniform(5, 9, 6), rng.uniform(0, 5, 4)])
    maps = rng.uniform(0, 1, (n, 16, 16)).astype(np.float32)
    masks = np.zeros((n, 16, 16), np.float32)
    masks[:6, 4:8, 4:8] = 1
    images = [np.zeros((3, 16, 16), np.float32)] * n
    paths = [f"/d/{'crack' if label else 'good'}/{i:03d}.png" for i, label in enumerate(labels)]
    metrics = {"config": "paper", "category": "brick", "image_auroc": 0.9066, "f1_threshold": 4.98765}
    html = write_run_report(tmp_path / "r.html", metrics, labels, scores, masks, maps, images, paths).read_text()
    assert "label 1" not in html and "label 0" not in html
    assert html.count("<b>Defect</b>") == 6 and html.count("<b>Good</b>") == 4  # each defect in one gallery only
    assert "histogram of good and defect image scores" in html and "colour bar of the heat maps" in html
    assert "<td>0.907</td>" in html and re.search(r"score \d\.\d\d<", html)


def test_index_page_has_a_title_and_says_what_each_configuration_is(tmp_path):
    html = write_summary_report(tmp_path / "i.html", [{"config": "paper", "category": "mean", "image_auroc": 1.0,
                                                       "memory_bank_size": 4704.0}],
                                ["config", "category", "image_auroc", "memory_bank_size"], {"paper/brick": "x"},
                                "mhpc demo: presets", {"paper": "PatchCore as published"}).read_text()
    assert "<title>mhpc demo: presets</title>" in html and "<dd>PatchCore as published</dd>" in html
    assert "<td>1.00</td>" in html and "<td>4704</td>" in html
