"""The HTML report and the `sap interpret` / `sap report` commands on synthetic artifacts."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from sapguard.cli import app
from sapguard.data.records import write_jsonl
from sapguard.errors import SapError
from sapguard.features.store import FeatureSet, load_features
from sapguard.interpret.report import SECTIONS, build_report, markdown_table
from sapguard.io import sha256_file, write_json
from sapguard.polytope.artifact import load_polytope
from tests.test_interpret_specialisation import synthetic_featureset, synthetic_polytope

METRICS = {
    "split": "test",
    "target_fpr": 0.05,
    "detectors": {
        name: {
            "accuracy": 0.9,
            "precision": 0.8,
            "recall": 0.7,
            "f1": 0.75,
            "fpr": 0.05,
            "auroc": 0.95,
            "pr_auc": 0.9,
        }
        for name in ("polytope", "logistic_probe")
    },
    "per_category_recall": {"violence": {"n": 17, "recall": 0.94}},
}
BENCH_MD = {"table_markdown": "| mode | attack success |\n|---|---:|\n| none | 0.62 |\n| safeflow | 0.08 |"}


def images(page: str) -> list[bytes]:
    """Decoded bytes of every <img>; fails on any source that is not an inline PNG."""
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert srcs and len(srcs) == page.count("<img ")
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def write_features_dir(fs: FeatureSet, directory: Path) -> Path:
    directory.mkdir(parents=True)
    write_jsonl(directory / "records.jsonl", fs.records)
    shard = directory / "shard-00000.safetensors"
    save_file(
        {"features": fs.features.contiguous(), "record_index": fs.record_index, "position": fs.position},
        str(shard),
    )
    manifest = {
        **fs.manifest,
        "format_version": 1,
        "complete": True,
        "rows": len(fs),
        "shards": [
            {"file": shard.name, "rows": len(fs), "records": len(fs.records), "sha256": sha256_file(shard)}
        ],
    }
    write_json(directory / "manifest.json", manifest)
    return directory


def test_report_has_every_section_and_only_inline_pngs(tmp_path):
    out, analysis = build_report(
        synthetic_polytope(), synthetic_featureset(), tmp_path / "r.html", metrics=METRICS, bench=BENCH_MD
    )
    page = out.read_text(encoding="utf-8")
    for section in (*SECTIONS, "steering"):
        assert f'<section id="{section}">' in page
    for k in range(4):
        assert f'id="facet-{k}"' in page
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images(page))
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert '<td>safeflow</td><td class="num">0.08</td>' not in page  # markdown cells stay text
    assert "<td>safeflow</td><td>0.08</td>" in page and "<th>attack success</th>" in page
    assert "logistic_probe" in page and "violent doxxing request" in page
    assert (tmp_path / "r_files" / "heatmap_binned.png").stat().st_size > 1000
    assert analysis.spec.matching
    with pytest.raises(SapError, match="is a directory"):
        build_report(synthetic_polytope(), synthetic_featureset(), tmp_path, metrics=METRICS)


def test_report_escapes_texts_and_handles_missing_parts(tmp_path):
    fs = synthetic_featureset(with_categories=False)
    # one split only, so the baselines cannot be fitted; a hostile text in the top rows
    records = [replace(r, split="test") for r in fs.records]
    records[0] = replace(records[0], prompt="<script>alert(1)</script> violence", is_safe=False)
    fs = FeatureSet(fs.features, fs.record_index, fs.position, records, fs.manifest)
    out, _ = build_report(synthetic_polytope(), fs, tmp_path / "r.html", top_k=len(records))
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; violence" in page
    assert "detection metrics not computed" in page  # no train split for the baselines
    assert "no category labels" in page and 'id="steering"' not in page
    images(page)


@pytest.mark.parametrize(
    "bench",
    [
        [{"mode": "none", "asr": 0.6}, {"mode": "safeflow", "asr": 0.1, "mmlu": 0.5}],
        {"rows": [{"mode": "refuse"}]},
        {"odd": 1},
    ],
)
def test_steering_section_is_lenient(tmp_path, bench):
    out, _ = build_report(
        synthetic_polytope(), synthetic_featureset(), tmp_path / "r.html", metrics=METRICS, bench=bench
    )
    section = out.read_text(encoding="utf-8").split('<section id="steering">')[1]
    if isinstance(bench, list):
        assert "<th>mmlu</th>" in section and "<td>safeflow</td>" in section
    elif "rows" in bench:
        assert "<td>refuse</td>" in section
    else:
        assert "&quot;odd&quot;: 1" in section


def test_markdown_table_parser():
    assert markdown_table(BENCH_MD["table_markdown"]) == (
        ["mode", "attack success"],
        [["none", "0.62"], ["safeflow", "0.08"]],
    )
    assert markdown_table("no table") is None


def test_cli_interpret_rename_and_report(tmp_path):
    feats = write_features_dir(synthetic_featureset(), tmp_path / "feats")
    assert len(load_features(feats)) == len(synthetic_featureset())
    synthetic_polytope().save_pretrained(tmp_path / "poly")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "interpret",
            "-p",
            str(tmp_path / "poly"),
            "-f",
            str(feats),
            "-o",
            str(tmp_path / "i"),
            "--rename",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {p["category"]: p["facet"] for p in data["specialisation"]["matching"]} == {
        "violence": 3,
        "privacy": 1,
        "fraud": 0,
    }
    assert load_polytope(tmp_path / "poly").facet_names == data["suggested_names"] == data["renamed"]["new"]
    assert Path(data["files"]["heatmap_binned"]).is_file()

    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "bench.json").write_text(json.dumps(BENCH_MD))
    res = runner.invoke(
        app,
        [
            "report",
            "-p",
            str(tmp_path / "poly"),
            "-f",
            str(feats),
            "-o",
            str(tmp_path / "r.html"),
            "--metrics",
            str(tmp_path / "metrics.json"),
            "--bench",
            str(tmp_path / "bench.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and '<section id="steering">' in (tmp_path / "r.html").read_text()

    (tmp_path / "bad.json").write_text("{nope")
    res = runner.invoke(
        app,
        [
            "report",
            "-p",
            str(tmp_path / "poly"),
            "-f",
            str(feats),
            "-o",
            str(tmp_path / "r2.html"),
            "--metrics",
            str(tmp_path / "bad.json"),
        ],
    )
    assert res.exit_code == 2 and "bad.json: malformed metrics JSON" in res.output
    res = runner.invoke(
        app, ["interpret", "-p", str(tmp_path / "nope"), "-f", str(feats), "-o", str(tmp_path / "i2")]
    )
    assert res.exit_code == 2 and "config.json: not found" in res.output
