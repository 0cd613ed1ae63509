"""Report formats beyond markdown: LaTeX, HTML (escaped; loads in a headless browser), plots; uncertainty and
the paired comparison with naive."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import markdown_rows, result, write

from cpt_bench.report.stats import sign_flip_test, summarise_values

from conftest import run_cli


def full_result(method: str, seed: int, final: list[float], diagonal: list[float], **overrides) -> dict:
    """A two-domain result with a score matrix, base scores and a perplexity matrix."""
    data = result(method=method, seed=seed, final_f1=sum(final) / 2, **overrides)
    data["matrix"] = {"macro_f1": [[diagonal[0], None], final], "accuracy": [[diagonal[0], None], final]}
    data["matrix_rows"] = list(data["domains"])
    data["base"] = {"macro_f1": [0.1, 0.1], "accuracy": [0.2, 0.2]}
    data["metrics"]["forgetting_macro_f1"] = diagonal[0] - final[0]
    data["perplexity"] = {"corpora": ["cats", "dogs", "general"], "base": [9.0, 9.0, 5.0],
                          "stages": [[4.0, 8.0, 5.5], [4.0 + seed, 3.0, 6.0]]}
    return data


def write_leaderboard(folder: Path, seeds: int) -> Path:
    for seed in range(seeds):
        write(folder, f"naive{seed}.json", full_result("naive", seed, [0.2 + 0.01 * seed, 0.9], [0.8, 0.9]))
        write(folder, f"ewc{seed}.json", full_result("ewc", seed, [0.5 + 0.02 * seed, 0.85], [0.8, 0.85]))
        one = full_result("one", seed, [0.8, 0.9], [0.8, 0.9])
        one["metrics"]["forgetting_macro_f1"] = None  # one model per domain: nothing to forget
        write(folder, f"one{seed}.json", one)
    return folder


@pytest.fixture
def leaderboard(tmp_path) -> Path:
    """naive, ewc and one at seeds 0, 1, 2 (ewc ahead of naive on every seed)."""
    return write_leaderboard(tmp_path / "runs", 3)


def _ok(*args: str) -> str:
    out = run_cli("report", *args)
    assert out.exit_code == 0, out.output
    return out.output


def test_t_interval():
    summary = summarise_values([1.0, 2.0, 3.0])
    assert summary.mean == 2.0 and summary.std == 1.0
    assert summary.ci_high - summary.mean == pytest.approx(4.303 / 3 ** 0.5, rel=1e-3)  # t(0.975, df=2)
    assert summarise_values([0.5]).ci_low is None  # one value: no interval


def test_three_pairs_of_one_sign_give_p_one_quarter_and_are_not_significant():
    same_sign = sign_flip_test([0.30, 0.32, 0.28])
    assert same_sign.p == 0.25 and same_sign.exact and not same_sign.significant  # 2 of the 8 sign patterns
    assert same_sign.ci_low > 0 and same_sign.mean_difference == pytest.approx(0.3)


def test_the_exact_p_of_a_hand_counted_case():
    # 7 differences of +1 and one of -1: |sum| = 6; patterns reaching |sum| >= 6 are all-equal signs (2) and
    # those with exactly one sign flipped against the rest (2 x 8): 18 of 256
    assert sign_flip_test([1.0] * 7 + [-1.0]).p == 18 / 256
    assert sign_flip_test([0.1] * 6).p == 2 / 64  # the fewest pairs that can reach p < 0.05
    assert sign_flip_test([0.1] * 6).significant and not sign_flip_test([0.1] * 5).significant


def test_zeros_and_ties():
    assert sign_flip_test([0.0, 0.0, 0.0]).p == 1.0  # no difference at all
    assert sign_flip_test([1.0, 0.0, 1.0]).p == 0.5  # a zero is the same under either sign: 4 of 8
    assert sign_flip_test([1.0, 1.0, -1.0, -1.0]).p == 1.0  # differences that cancel
    # float rounding must not drop the observed pattern itself
    assert sign_flip_test([0.1, 0.2, 0.3 - 1e-17, -0.6]).p == 1.0


def test_many_pairs_are_sampled_from_a_fixed_seed():
    differences = [0.05 * (i % 3 - 0.5) for i in range(20)]
    first, second = sign_flip_test(differences), sign_flip_test(differences)
    assert not first.exact and first.p == second.p and 0 < first.p <= 1
    assert sign_flip_test([0.1] * 20).p < 1e-4


def test_paper_table_domains_best_and_significance(leaderboard):
    rows = {r["method"]: r for r in markdown_rows(_ok(str(leaderboard)))}
    assert set(rows) == {"naive", "ewc", "one"}
    assert rows["ewc"]["cats"] == "0.520 ± 0.020" and rows["naive"]["dogs"] == "0.900 ± 0.000"
    # ewc beats naive on every matched seed, but 3 pairs cannot give p < 0.05: no marker
    assert not rows["ewc"]["final MF1"].endswith(("▲", "▼"))
    # knowledge transfer against `one` of the same seed: mean_j A[T-1][j] - ONE[j][j]
    assert rows["naive"]["KT vs one"] == "-0.295 ± 0.005"  # ((0.2 + 0.01 s - 0.8) + 0) / 2
    assert rows["one"]["KT vs one"] == "—"
    # perplexity forgetting: P[T-1][cats] - P[0][cats] = seed
    assert rows["naive"]["ppl forgetting"] == "1.00 ± 1.00"
    assert rows["one"]["ppl forgetting"] == "—"  # undefined where end-task forgetting is
    text = _ok(str(leaderboard))
    assert re.search(r"\|\s*\*\*0\.850 ± 0\.000\*\*\s*\|", text), "best final MF1 (one) is bold"
    assert "0.25" in text.split("Paired comparisons with naive", 1)[1]  # the p of every comparison is listed


def test_six_matched_pairs_can_be_significant(tmp_path):
    rows = {r["method"]: r for r in markdown_rows(_ok(str(write_leaderboard(tmp_path / "runs", 6))))}
    # ewc beats naive on every one of 6 matched seeds: p = 2/64; naive is the reference: never marked
    assert rows["ewc"]["final MF1"].endswith("▲") and rows["ewc"]["forgetting MF1"].endswith("▲")
    assert rows["one"]["final MF1"].endswith("▲")
    assert not rows["naive"]["final MF1"].endswith(("▲", "▼"))
    assert not rows["ewc"]["ppl forgetting"].endswith(("▲", "▼"))  # the same perplexities as naive: p = 1


def test_json_has_confidence_intervals_and_comparison(leaderboard):
    records = {r["method"]: r for r in json.loads(_ok(str(leaderboard), "--format", "json"))}
    ewc = records["ewc"]
    low, high = ewc["final MF1 ci95"]
    assert low < ewc["final MF1 mean"] < high
    comparison = ewc["final MF1 vs naive"]
    assert comparison["pairs"] == 3 and comparison["p"] == 0.25 and not comparison["significant"]
    assert comparison["mean_difference"] == pytest.approx(0.13)  # mean_s ((0.3 + 0.01 s) - 0.05) / 2


def test_latex_escapes_and_marks_best(tmp_path):
    folder = tmp_path / "runs"
    write(folder, "a.json", result(method="naive", suite="my_suite&co", final_f1=0.4))
    write(folder, "b.json", result(method="ewc", suite="my_suite&co", final_f1=0.6))
    text = _ok(str(folder), "--format", "latex")
    assert r"my\_suite\&co" in text and "my_suite&co" not in text
    assert r"\textbf{0.600}" in text
    assert text.count(r"\\") >= 3 and r"\begin{tabular}" in text


def test_plots_are_written(leaderboard, tmp_path):
    _ok(str(leaderboard), "--plots", str(tmp_path / "plots"))
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    for method in ("naive", "ewc", "one"):
        for kind in ("matrix", "curves", "perplexity"):
            assert any(n.startswith(f"tiny__{method}__") and n.endswith(f"__{kind}.png") for n in names), names
    assert all((tmp_path / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_html_escapes_every_string_from_results(tmp_path):
    folder = tmp_path / "runs"
    hostile = "<script>alert('x')</script>"
    write(folder, "a.json", result(method="naive", suite=hostile, domains=("<b>cats</b>", "dogs")))
    write(folder, "b.json", result(method="naive", suite=hostile, domains=("<b>cats</b>", "dogs"), seed=1,
                                   settings={"dap": {"steps": "<img src=x onerror=alert(1)>"}}))
    page = _ok(str(folder), "--format", "html")
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>cats" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own sorting script


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser (install Debian's chromium to run this test)")
def test_html_page_loads_in_a_headless_browser(leaderboard, tmp_path):
    page = tmp_path / "leaderboard.html"
    _ok(str(leaderboard), "--format", "html", "--output", str(page))
    done = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no script error, no warning printed by the page
    body = done.stdout.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    methods = re.findall(r'<tr><td class="text" data-value="([^"]+)"', body)
    assert sorted(methods) == ["ewc", "naive", "one"]  # one row per method
    assert done.stdout.count('src="data:image/png;base64,') == 9  # 3 plots per method, embedded
