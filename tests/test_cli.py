import pytest

from moeviz.cli import main
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


def test_info_reads_no_weight(tiny_dir, capsys):
    for weights in tiny_dir.glob("*.safetensors"):  # a checkpoint whose weights cannot be read
        weights.rename(weights.with_suffix(".hidden"))
    try:
        assert main(["info", "--model", str(tiny_dir)]) == 0
    finally:
        for weights in tiny_dir.glob("*.hidden"):
            weights.rename(weights.with_suffix(".safetensors"))
    out = capsys.readouterr().out
    assert "olmoe, 2 MoE layers, top-2" in out and "num_experts=8" in out


def test_a_model_that_cannot_fit_is_refused_in_one_line(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("MOEVIZ_MAX_MEMORY", "10K")
    assert main(["calibrate", "--model", str(tiny_dir), "--data", "random", "--samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only 0.0 GiB of RAM is free" in err
    assert "--device-map auto" in err and "--offload" in err


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
                     "--data", "random", "--samples", "4", "--seq-len", "16",
                     "--runs", str(runs), "--out", str(report)]) == 0
    capsys.readouterr()
    table = RunStore(runs).table()
    assert list(table["method"]) == ["original", "frequency", "frequency"]
    assert list(table["ratio"]) == [0.0, 0.25, 0.5]
    assert table["kl"].iloc[0] == pytest.approx(0, abs=1e-7) and (table["kl"].iloc[1:] > 0).all()
    assert json.loads(report.read_text())["perplexity"] == pytest.approx(table["perplexity"].iloc[-1])
    assert main(["evaluate", "--model", str(tiny_dir), "--plan", str(plan), "--stats", stats_dir, "--data", "random",
                 "--samples", "4", "--seq-len", "16", "--runs", str(runs)]) == 0
    assert "already stored" in capsys.readouterr().err and len(RunStore(runs).list()) == 3  # not twice
