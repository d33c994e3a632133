"""Per-facet views and figures: texts paired with their own rows, usage, similarity, non-empty PNGs."""

from __future__ import annotations

import io
from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest

from sapguard.errors import SapError
from sapguard.interpret import plots
from sapguard.interpret.pipeline import analyse, check_features, write_analysis
from sapguard.interpret.views import facet_similarity, facet_views
from sapguard.polytope.specialisation import analyse_specialisation, polytope_margins
from tests.test_interpret_specialisation import synthetic_featureset, synthetic_polytope, synthetic_rows

PNG = b"\x89PNG\r\n\x1a\n"


def decode(png: bytes) -> np.ndarray:
    assert png.startswith(PNG)
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_top_texts_are_paired_with_their_own_rows():
    fs = synthetic_featureset()
    poly = synthetic_polytope()
    x, y, recs = fs.subset("test")
    views = facet_views(poly, x, y, recs, k=3)
    margins = polytope_margins(poly, x)
    by_prompt = {r.prompt: i for i, r in enumerate(recs)}
    for k, tops in enumerate(views.top_texts):
        assert [t["margin"] for t in tops] == sorted(margins[:, k], reverse=True)[:3]
        for t in tops:  # the text's own features give the reported margin
            assert margins[by_prompt[t["text"]], k] == pytest.approx(t["margin"])
    assert all("violence" in t["categories"] for t in views.top_texts[3])
    assert all("fraud" in t["text"] for t in views.top_texts[0])


def test_usage_similarity_and_projection():
    x, y, recs = synthetic_rows()
    poly = synthetic_polytope()
    views = facet_views(poly, x, y, recs, max_points=50)
    assert np.allclose(facet_similarity(poly), np.eye(4))
    assert views.fired[2] == 0 and views.first[2] == 0
    # every unsafe row is flagged once; the 10 multi-label rows fire two facets
    assert views.first.sum() == 130 and views.fired.sum() == 140 and views.fired[3] == 50
    assert views.projection.shape == (50, 2) and views.firing.shape == (50,)
    assert 0 < sum(views.explained) <= 1.0
    with pytest.raises(SapError, match="no rows"):
        facet_views(poly, x[:0], y[:0], [])


def test_every_figure_is_a_real_png():
    x, y, recs = synthetic_rows()
    poly = synthetic_polytope()
    spec = analyse_specialisation(poly, x, y, recs)
    views = facet_views(poly, x, y, recs)
    figures = [
        plots.mi_heatmap(spec),
        plots.mi_heatmap(spec, mode="fired"),
        plots.similarity_heatmap(views.similarity, views.facet_names),
        plots.usage_bars(views),
        plots.projection_scatter(views),
        plots.margin_histogram(views.margins[:, 0], views.labels, "f0"),
    ]
    for png in figures:
        image = decode(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn


def test_analysis_writes_tables_and_figures(tmp_path):
    fs = synthetic_featureset()
    # a category that only the train split carries is reported for the test split, not matched
    fs.records[0] = replace(fs.records[0], categories=("sexual",), split="train")
    analysis = analyse(synthetic_polytope(), fs, split="test")
    written = write_analysis(analysis, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "interpret.json",
        "mi_binned.csv",
        "mi_fired.csv",
        "matching.md",
        "heatmap_binned.png",
        "facet_3.png",
    } <= names
    assert all(p.stat().st_size > 0 for p in written.values())
    csv_lines = (tmp_path / "out" / "mi_binned.csv").read_text().splitlines()
    assert csv_lines[0] == "category,rows,facet_0,facet_1,facet_2,facet_3" and len(csv_lines) == 5
    assert csv_lines[3].startswith("sexual,0,") and "sexual" not in {
        p["category"] for p in analysis.spec.matching
    }
    assert any("without rows" in n and "sexual" in n for n in analysis.spec.notes)
    assert "| violence |" in (tmp_path / "out" / "matching.md").read_text()
    (tmp_path / "file").write_text("")
    with pytest.raises(SapError, match="not a directory"):
        write_analysis(analysis, tmp_path / "file")


def test_analysis_without_categories_skips_only_the_category_parts(tmp_path):
    fs = synthetic_featureset(with_categories=False)
    analysis = analyse(synthetic_polytope(), fs, split="test")
    assert "heatmap_binned" not in analysis.figures and "projection" in analysis.figures
    names = {p.name for p in write_analysis(analysis, tmp_path / "out").values()}
    assert "mi_binned.csv" not in names and "facet_0.png" in names
    with pytest.raises(SapError, match="needs category labels"):
        plots.mi_heatmap(analysis.spec)


def test_features_from_another_layer_are_refused():
    fs = synthetic_featureset()
    fs.manifest["layer"] = 7
    with pytest.raises(SapError, match="layer 7"):
        check_features(synthetic_polytope(), fs)
    fs.manifest.update(layer=3, hidden_size=16)
    with pytest.raises(SapError, match="hidden size 16"):
        check_features(synthetic_polytope(), fs)
