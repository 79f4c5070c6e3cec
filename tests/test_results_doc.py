"""docs/results.md embeds the AV-MNIST report of the committed records, kept in sync."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_doc_holds_the_report_of_the_committed_records(avmnist, tmp_path):
    config, _ = avmnist.parse_args(["--fusion", "all", "--seeds", "0,1,2",
                                    "--results", str(ROOT / "results")])
    experiment = avmnist.AVMNIST(config)
    result = experiment.report(tmp_path)
    assert result["expected_runs"] == 39
    doc = (ROOT / "docs" / "results.md").read_text()
    assert experiment.docs_block(tmp_path) in doc, (
        "docs/results.md is out of date with results/: run python experiments/avmnist.py "
        "--fusion all --seeds 0,1,2 --report --out /tmp/avr --docs docs/results.md")
    # The page says plainly how many runs are in, and claims completeness only if true.
    assert f"{result['current_runs']} of 39 runs have a current record" in doc
    assert ("is **not complete yet**" in doc) == (not result["complete"])
