"""The lab: report structure on a smoke run, verdicts recomputed from results.json, rules.

Tests never assert a particular verdict: the data decides those."""

import json
import re

import pytest

from normlab.lab import rules
from normlab.lab.main import main as report_main
from normlab.lab.runner import CLAIM_KEYS, PROFILES, VERDICTS, Verdict, load_claims


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert report_main("smoke", None, str(out), seed=0) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_report_covers_every_claim_in_article_order(smoke_report):
    _, document = smoke_report
    assert [c["key"] for c in document["claims"]] == list(CLAIM_KEYS)
    assert [c["letter"] for c in document["claims"]] == list("abcdefg")


def test_every_verdict_is_recomputed_from_results_json(smoke_report):
    _, document = smoke_report
    for claim, recorded in zip(load_claims(), document["claims"], strict=True):
        verdict = claim.verdict(recorded["numbers"])
        assert recorded["verdict"] == {
            "label": verdict.label,
            "reason": verdict.reason,
            "deciding": verdict.deciding,
        }
        assert verdict.label in VERDICTS


def test_every_section_says_what_was_run_the_rule_and_the_literature(smoke_report):
    _, document = smoke_report
    for claim in document["claims"]:
        for field in ("article", "what_was_run", "rule", "literature", "title"):
            assert claim[field].strip(), (claim["key"], field)
        assert claim["figures"], f"{claim['key']} has no figure"
        assert claim["verdict"]["deciding"].strip()


def test_html_report_is_self_contained_with_the_verdict_table_first(smoke_report):
    out, document = smoke_report
    page = (out / "report.html").read_text()
    assert page.index("<table>") < page.index("<section")
    assert not re.search(r"""(src|href)=["']https?:""", page), "external resource in report"
    figure_count = sum(len(c["figures"]) for c in document["claims"])
    assert page.count("data:image/png;base64,") == figure_count
    for claim in document["claims"]:
        assert f'href="#{claim["key"]}"' in page and f'id="{claim["key"]}"' in page


def test_markdown_report_links_its_figures(smoke_report):
    out, document = smoke_report
    text = (out / "report.md").read_text()
    for claim in document["claims"]:
        for name in claim["figures"]:
            assert f"({claim['key']}-{name}.png)" in text
            assert (out / f"{claim['key']}-{name}.png").stat().st_size > 1000


def test_results_json_records_the_run(smoke_report):
    _, document = smoke_report
    meta = document["meta"]
    assert meta["profile"] == "smoke" and meta["seed"] == 0
    assert meta["seeds"] == PROFILES["smoke"].seeds


def test_a_claim_is_deterministic_for_a_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert report_main("smoke", ["definition"], str(tmp_path / name), seed=3) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["claims"][0]["numbers"] == runs[1]["claims"][0]["numbers"]


def test_resume_keeps_recorded_claims_and_rerun_runs_named_ones_again(tmp_path):
    out = str(tmp_path)
    assert report_main("smoke", ["definition", "position"], out, seed=0) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    # Mark the recorded numbers: a kept claim carries them over, a rerun one replaces them.
    for claim in first["claims"]:
        claim["seconds"] = 1234.5
    (tmp_path / "results.json").write_text(json.dumps(first))

    assert report_main("smoke", ["definition", "position"], out, 0, True, ("position",)) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    seconds = {c["key"]: c["seconds"] for c in second["claims"]}
    assert seconds["definition"] == 1234.5
    assert seconds["position"] != 1234.5
    assert second["meta"]["resumed"]["kept"] == ["(a)"]
    assert second["meta"]["resumed"]["rerun"] == ["(g)"]
    header = (tmp_path / "report.md").read_text()
    assert "(a) were kept from the run recorded at" in header
    assert "(g) ran again by request (--rerun)" in header

    with pytest.raises(SystemExit, match="--rerun: expected experiments"):
        report_main("smoke", ["definition"], out, 0, True, ("nonsense",))


def test_only_rejects_unknown_experiments():
    with pytest.raises(ValueError, match="unknown experiment"):
        load_claims(["padding", "nonsense"])


def test_only_selects_in_article_order():
    assert [c.key for c in load_claims(["position", "definition"])] == ["definition", "position"]


def test_consistent_effect_needs_every_seed_and_a_mean_beyond_the_spread():
    assert rules.consistent_effect([1.0, 1.2, 0.9])
    assert not rules.consistent_effect([1.0, -0.1, 2.0])  # one seed disagrees
    assert not rules.consistent_effect([0.1, 3.0, 0.1])  # mean within the spread
    assert not rules.consistent_effect([])


def test_spread_is_the_sample_standard_deviation():
    assert rules.spread([2.0]) == 0.0
    assert rules.spread([1.0, 3.0]) == pytest.approx(2**0.5)
    assert rules.mean([1.0, 2.0, 6.0]) == 3.0


def test_verdict_labels_are_checked():
    with pytest.raises(ValueError, match="verdict label"):
        Verdict("probably", "", "")


def test_profiles_pick_their_own_sizes():
    assert PROFILES["quick"].pick(smoke=1, quick=2, full=3) == 2
    assert PROFILES["smoke"].seeds <= PROFILES["quick"].seeds <= PROFILES["full"].seeds
