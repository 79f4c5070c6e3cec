"""docs/results.md embeds the AV-MNIST report of the committed records, kept in sync."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def avmnist():
    name = "_lepton_avmnist_results_doc"
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "avmnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def test_results_doc_holds_the_report_of_the_committed_records(avmnist, tmp_path):
    config, _ = avmnist.parse_args(["--fusion", "all", "--seeds", "0,1,2",
                                    "--results", str(ROOT / "results")])
    result = avmnist.report(config, tmp_path)
    assert result["expected_runs"] == 39
    doc = (ROOT / "docs" / "results.md").read_text()
    assert avmnist.docs_block(tmp_path) in doc, (
        "docs/results.md is out of date with results/: run python experiments/avmnist.py "
        "--fusion all --seeds 0,1,2 --report --out /tmp/avr --docs docs/results.md")
    # The page says plainly how many runs are in, and claims completeness only if true.
    assert f"{result['current_runs']} of 39 runs have a current record" in doc
    assert ("is **not complete yet**" in doc) == (not result["complete"])


def test_update_docs_replaces_only_the_marked_block(avmnist, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.md").write_text("| method |\n|---|\n| concat |\n")
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{avmnist.DOCS_BEGIN}\nold table\n{avmnist.DOCS_END}\nafter\n")
    avmnist.update_docs(report, doc)
    assert doc.read_text() == (f"intro\n{avmnist.DOCS_BEGIN}\n| method |\n|---|\n"
                               f"| concat |\n{avmnist.DOCS_END}\nafter\n")
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="--docs: .*no"):
        avmnist.update_docs(report, tmp_path / "plain.md")
