import time

import pytest

from moeviz.calibrate import CalibConfig
from moeviz.cli import main
from moeviz.jobs import start_calibration
from moeviz.stats import ExpertStats
from moeviz.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_model("olmoe").save_pretrained(path)
    return path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "calibrate" in out and "info" in out


def test_calibrate_prints_the_stats_directory_last(tiny_dir, tmp_path, capsys):
    args = ["calibrate", "--model", str(tiny_dir), "--data", "random", "--samples", "4",
            "--seq-len", "16", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    stats = ExpertStats.load(last)
    assert stats.meta["tokens"] == 64 and stats.meta["architecture"] == "olmoe"


@pytest.mark.parametrize("args, message", [
    (["calibrate", "--model", "./no/such/model"], "No such model directory"),
    (["calibrate", "--data", "demo:poetry"], "Unknown demo domain"),
    (["info", "--model", "/"], "no config.json"),
    (["stability", "--methods", "cprune"], "stability takes score-based methods"),
    (["stability", "--samples", "4", "--chunks", "8"], "--chunks must be between 2 and --samples"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_calibration_job_reports_progress_and_the_result(tiny_dir, tmp_path):
    config = CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path / "cache")
    job = start_calibration(str(tiny_dir), config, device="cpu", workdir=tmp_path / "job")
    deadline = time.time() + 120
    while job.status()["state"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.2)
    status = job.status()
    assert status["state"] == "done", status
    assert status["done"] == status["total"] == 4
    assert ExpertStats.load(status["path"]).meta["calibration"]["num_samples"] == 4


def test_failed_job_says_why(tmp_path):
    job = start_calibration(str(tmp_path / "missing"), CalibConfig(data="random", cache_dir=tmp_path),
                            device="cpu", workdir=tmp_path / "job")
    job.process.wait(timeout=120)
    status = job.status()
    assert status["state"] == "failed" and "No such model directory" in status["error"]


def test_plan_and_prune_commands(tiny_dir, tmp_path, capsys):
    assert main(["calibrate", "--model", str(tiny_dir), "--data", "random", "--samples", "4",
                 "--seq-len", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    stats_dir = capsys.readouterr().out.strip().splitlines()[-1]
    plan = tmp_path / "plan.json"
    assert main(["plan", "--stats", stats_dir, "--method", "mone", "--ratio", "0.25", "--out", str(plan)]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--stats", stats_dir,
                 "--out", str(tmp_path / "pruned")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "pruned")
    assert (tmp_path / "pruned" / "moeviz_plan.json").is_file()  # novices reload through moeviz
    # novices need the stats; an impossible ratio is one line
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--out", str(tmp_path / "p2")]) == 2
    assert "needs its ExpertStats" in capsys.readouterr().err
    assert main(["plan", "--stats", stats_dir, "--method", "frequency", "--ratio", "0.95", "--out", str(plan)]) == 2
    assert "fewer than top-k" in capsys.readouterr().err


def test_evaluate_a_plan_stores_the_original_once_as_the_baseline(tiny_dir, tmp_path, capsys):
    import json

    from moeviz.runs import RunStore

    assert main(["calibrate", "--model", str(tiny_dir), "--data", "random", "--samples", "4",
                 "--seq-len", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    stats_dir = capsys.readouterr().out.strip().splitlines()[-1]
    runs, report = tmp_path / "runs.sqlite", tmp_path / "report.json"
    for ratio in ("0.25", "0.5"):
        plan = tmp_path / f"plan-{ratio}.json"
        assert main(["plan", "--stats", stats_dir, "--method", "frequency", "--ratio", ratio, "--out", str(plan)]) == 0
        assert main(["evaluate", "--model", str(tiny_dir), "--plan", str(plan), "--stats", stats_dir,
                     "--data", "random", "--samples", "4", "--seq-len", "16", "--no-throughput",
                     "--runs", str(runs), "--out", str(report)]) == 0
    capsys.readouterr()
    table = RunStore(runs).table()
    assert list(table["method"]) == ["original", "frequency", "frequency"]
    assert list(table["ratio"]) == [0.0, 0.25, 0.5]
    assert table["kl"].iloc[0] == pytest.approx(0, abs=1e-7) and (table["kl"].iloc[1:] > 0).all()
    assert json.loads(report.read_text())["perplexity"] == pytest.approx(table["perplexity"].iloc[-1])
