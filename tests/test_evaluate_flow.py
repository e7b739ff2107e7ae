"""The real evaluate flow on a fixed subset of LIMIT-small: report schema, runs, plots, bad input."""
from __future__ import annotations

import json

import pytest
from ranx import Run

from evaluation.datasets import DatasetError
from evaluation.systems import ALL_SYSTEMS
from flows.evaluate import evaluate_flow
from tests.conftest import small_index_config

DESIGN_METRICS = {"ndcg@10", "recall@100", "map@100", "mrr@10"}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, limit_small, prefect_harness):
    out = tmp_path_factory.mktemp("eval") / "report"
    evaluate_flow(str(limit_small), str(out), index_dir=str(out.parent / "index"), config=small_index_config(), max_queries=25)
    return out


def test_report_json_has_the_design_schema(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert report["dataset"] == "limit-small" and report["split"] == "test"
    assert report["docs"] == 46 and report["queries"] == 25
    assert report["dataset_issues"]["queries_sampled_from"] == 1000
    assert set(report["systems"]) == set(ALL_SYSTEMS)
    for name, facts in report["systems"].items():
        assert DESIGN_METRICS <= set(facts), name
        assert all(0.0 <= facts[m] <= 1.0 for m in DESIGN_METRICS)
        assert facts["latency_ms"]["p50"] > 0 and facts["latency_ms"]["p95"] >= facts["latency_ms"]["p50"]
    index = report["index"]
    for key in ("model", "fde_dim", "chunks", "tokens", "bytes_on_disk", "build_seconds"):
        assert key in index
    assert index["fde_dim"] == 8 * 2**3 * 16 and index["chunks"] > 46
    # token-level matching beats one vector per chunk by far on LIMIT-small (even with these tiny
    # 64-token windows), and reranking the FDE candidates recovers the brute-force ranking
    systems = report["systems"]
    assert systems["maxsim-exact"]["ndcg@10"] >= systems["dense"]["ndcg@10"] + 0.2
    assert systems["fde-rerank"]["ndcg@10"] >= 0.98 * systems["maxsim-exact"]["ndcg@10"]
    sig = report["significance"]
    assert sig["reference"] == "maxsim-exact" and set(sig["systems"]) == set(ALL_SYSTEMS) - {"maxsim-exact"}
    prf = report["significance_prf"]
    assert prf["reference"] == "fde-rerank" and set(prf["systems"]) == {"fde-prf-rerank", "fde-prf-retrieve"}
    assert report["machine"]["cores"] >= 1


def test_runs_markdown_and_plots_are_written(report_dir):
    for name in ALL_SYSTEMS:
        trec = report_dir / "runs" / f"{name}.trec"
        run = Run.from_file(str(trec), kind="trec")  # LIMIT's ids hold spaces: percent-encoded there
        assert len(run.run) == 25 and any("%20" in doc for docs in run.run.values() for doc in docs)
        assert (report_dir / "runs" / f"{name}.parquet").stat().st_size > 0
    text = (report_dir / "report.md").read_text()
    assert "| **maxsim-exact** |" in text and "lateflow evaluate" in text and "Bonferroni" in text
    assert "ColBERT-PRF against **fde-rerank**" in text
    for plot in ("fde_recall.png", "quality_latency.png"):
        assert (report_dir / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_system_and_missing_split_are_clear_errors(tmp_path, limit_small, prefect_harness):
    with pytest.raises(ValueError, match="unknown system"):
        evaluate_flow(str(limit_small), str(tmp_path / "a"), systems=["colbert-magic"])
    with pytest.raises(DatasetError, match="no qrels for split 'dev'"):
        evaluate_flow(str(limit_small), str(tmp_path / "b"), split="dev")


def test_evaluate_with_an_existing_index_leaves_it_as_it_is(tmp_path, limit_small, limit_small_index, capsys):
    """`lateflow evaluate --index DIR` without index options: no rebuild with the defaults, no switch."""
    import shutil

    from lateflow.cli import main as cli_main
    from storage.versions import current_version

    index = tmp_path / "index"
    shutil.copytree(limit_small_index, index)
    before = current_version(index)
    args = ["evaluate", str(limit_small), "--out", str(tmp_path / "r"), "--index", str(index), "--systems", "bm25", "--max-queries", "5"]
    assert cli_main(args) == 0
    assert current_version(index) == before and sorted(p.name for p in (index / "versions").iterdir()) == [before]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["chunking"]["window"] == 64  # the index's own settings, not the default 256
    # an index of another corpus is refused, not rebuilt
    other = tmp_path / "other"
    shutil.copytree(limit_small, other)
    with open(other / "corpus.jsonl", "a", encoding="utf-8") as corpus:
        corpus.write(json.dumps({"_id": "extra", "title": "", "text": "Hugo likes quokkas."}) + "\n")
    assert cli_main(["evaluate", str(other), *args[2:]]) == 2
    assert "was built from" in capsys.readouterr().err and current_version(index) == before


def test_evaluate_keeps_its_own_default_index_up_to_date(tmp_path, limit_small, prefect_harness):
    """Without --index, OUT/index is the command's own: a changed corpus updates it, never an error."""
    import shutil

    from lateflow.cli import main as cli_main

    dataset = tmp_path / "ds"
    shutil.copytree(limit_small, dataset)
    args = ["evaluate", str(dataset), "--out", str(tmp_path / "r"), "--systems", "bm25", "--max-queries", "5", "--fde-reps", "8", "--fde-bits", "3", "--fde-proj", "16"]
    assert cli_main(args) == 0
    with open(dataset / "corpus.jsonl", "a", encoding="utf-8") as corpus:
        corpus.write(json.dumps({"_id": "extra", "title": "", "text": "Hugo likes quokkas."}) + "\n")
    assert cli_main(args) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["docs"] == 47
