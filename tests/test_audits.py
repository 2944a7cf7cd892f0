"""``privrec audit``: the day's training run repeated with canaries (passes; with the noise off
it fails, exit code 2) and the DP statistics tester on the day's release configuration (no
statistic refuted; the result goes into the DP report). Both write public results only to
``reports/audits/dt=D/``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import DAY, released_day
from privrec_pipeline.audits import DP_STATS_FILE, TRAINING_FILE, audit_folder
from privrec_pipeline.cli import app
from privrec_pipeline.training import tasks
from privrec_pipeline.training.federated import TrainConfig
from privrec_pipeline.training.partitions import PartitionParams, run_build_partitions

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory, keyring):
    root = str(tmp_path_factory.mktemp("audits") / "lake")
    released_day(spark, root, keyring, {"events": 4000, "users": 200, "items": 60, "seed": 5})
    run_build_partitions(spark, root, DAY, PartitionParams(window_days=1, partitions=2, holdout_user_share=0.2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_BUDGET_EPSILON", "1000")
        # q = 1 (a batch larger than any partition): the canaries' strongest signal.
        tasks.prepare_training(root, DAY, TrainConfig(mode="local", epsilon=1.0, rounds=2, local_steps=3,
                                                      batch_size=1000, dim=4), run_id="run-1", dag_id="d")
    return root


def test_the_training_audit_passes_and_fails_with_the_noise_off(lake):
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "training", "--date", DAY.isoformat(), "--canaries", "400", "--lake", lake])
    assert ok.exit_code == 0 and "passed" in ok.output, ok.output
    written = json.loads((audit_folder(lake, DAY) / TRAINING_FILE).read_text())
    assert written["passed"] and written["noise"] and written["canaries"] == 400
    assert written["claimed_epsilon"] == pytest.approx(1.0, rel=1e-3) and written["epsilon_lower"] <= 1.0
    off = runner.invoke(app, ["audit", "training", "--date", DAY.isoformat(), "--canaries", "400", "--no-noise",
                              "--lake", lake])
    assert off.exit_code == 2 and "FAILED" in off.output, off.output
    assert json.loads((audit_folder(lake, DAY) / TRAINING_FILE).read_text())["epsilon_lower"] > 2.0
    missing = runner.invoke(app, ["audit", "training", "--date", "2026-02-01", "--lake", lake])
    assert missing.exit_code == 1 and "no training run for 2026-02-01" in missing.output


def test_the_dp_statistics_audit_refutes_nothing_and_is_in_the_dp_report(lake):
    from privrec_pipeline.dp_stats.release import REPORT_FILE, dp_stats_uri
    from privrec_pipeline.lake import path as lake_path

    runner = CliRunner()
    result = runner.invoke(app, ["audit", "stats", "--date", DAY.isoformat(), "--runs", "300", "--lake", lake])
    assert result.exit_code == 0, result.output
    written = json.loads((audit_folder(lake, DAY) / DP_STATS_FILE).read_text())
    release = json.loads((lake_path(dp_stats_uri(lake, DAY)) / "release.json").read_text())
    released = {name: s for name, s in release["statistics"].items() if s["mechanism"] != "exponential"}
    assert set(written["statistics"]) == set(released)
    for name, bound in written["statistics"].items():  # the epsilons the release was built with
        assert bound["claimed_epsilon"] == pytest.approx(released[name]["epsilon"], rel=1e-9)
    assert written["passed"] and all(not b["refutes"] for b in written["statistics"].values())
    page = (lake_path(dp_stats_uri(lake, DAY)) / REPORT_FILE).read_text()
    assert "<h2>Audit</h2>" in page and "empirical lower bound" in page and "Passed" in page
    missing = runner.invoke(app, ["audit", "stats", "--date", "2026-02-01", "--lake", lake])
    assert missing.exit_code == 1 and "no DP statistics release for 2026-02-01" in missing.output
