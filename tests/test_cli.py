import json

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
    # the options it names are the command's own, and they reach the loader
    assert main(["calibrate", "--model", str(tiny_dir), "--data", "random", "--device-map", "auto", "--offload"]) == 2
    assert "Use either offload or device_map, not both" in capsys.readouterr().err


def test_plan_and_prune_commands(tiny_dir, tmp_path, capsys):
    assert main(["calibrate", "--model", str(tiny_dir), "--data", "random", "--samples", "4",
                 "--seq-len", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    stats_dir = capsys.readouterr().out.strip().splitlines()[-1]
    plan = tmp_path / "plan.json"
    assert main(["plan", "--stats", stats_dir, "--method", "mone", "--ratio", "0.25", "--out", str(plan)]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--stats", stats_dir,
                 "--out", str(tmp_path / "pruned")]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(tmp_path / "pruned")
    assert "exports as expert substitution" in err.splitlines()[0]  # what `plan` says
    assert err.splitlines()[1].startswith("exporting as expert substitution (novices")  # before anything is written
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "expert_substitution" in config["compression_config"]["transform_config"]
    assert (tmp_path / "pruned" / "README.md").read_text().startswith("---\n")
    # without --stats, the calibration the plan records; novices need stats; an impossible ratio is one line
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--out", str(tmp_path / "p2")]) == 0
    unknown = json.loads(plan.read_text()) | {"calibration": None}
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(tmp_path / "unknown.json"), "--out",
                 str(tmp_path / "p3")]) == 2
    assert "needs its ExpertStats" in capsys.readouterr().err
    assert main(["plan", "--stats", stats_dir, "--method", "cprune", "--features", "weights", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "cw.json")]) == 0  # the weights read from the files, layer by layer
    capsys.readouterr()
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
    for stored in ([], ["--runs", str(runs)]):  # the plan's figures beside the original's, evaluated the same way
        assert main(["evaluate", "--model", str(tiny_dir), "--plan", str(plan), "--stats", stats_dir, "--data",
                     "random", "--samples", "4", "--seq-len", "16", *stored]) == 0
        head, *rows = capsys.readouterr().out.strip().splitlines()
        assert head.split() == ["original", "pruned", "change"]
        kl = next(r for r in rows if r.split()[0] == "kl").split()
        assert kl[1] == "0" and float(kl[2]) > 0 and kl[3].startswith("+")


def test_each_run_is_compared_with_the_original_evaluated_the_same_way(tmp_path, capsys):
    from moeviz.runs import Run, RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    small, large = dict(data="demo", num_samples=8, seq_len=64), dict(data="demo", num_samples=64, seq_len=128)
    store.add(Run("demo", "original", 0.0, {"perplexity": 20.0, "eval": small}, fingerprint="fp"))
    store.add(Run("demo", "original", 0.0, {"perplexity": 14.0, "eval": large}, fingerprint="fp"))
    store.add(Run("demo", "mone", 0.25, {"perplexity": 17.0, "eval": large}, "novice", "layer", fingerprint="fp"))
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite")]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "mone" in line][0]
    assert "+3" in row and "demo, 64 × 128" in row  # against 14, not 20


def test_the_runs_table_fits_the_terminal_unless_asked_wide(tmp_path, capsys, monkeypatch):
    from moeviz.runs import Run, RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    ev = dict(data="demo", num_samples=64, seq_len=128, demo_tasks=True)
    metrics = dict(eval=ev, perplexity=17.0, perplexity_se=0.5, task_mean=0.8, kl=0.3, top1_agreement=0.8,
                   params_saved=0.21, **{f"task_{d}": 0.8 for d in ("arithmetic", "sequences", "prose", "code", "dates")})
    store.add(Run("a-model-with-a-long-name/of-some-size", "original", 0.0, dict(metrics, kl=0.0), fingerprint="fp"))
    store.add(Run("a-model-with-a-long-name/of-some-size", "mone", 0.25, metrics, "novice", "layer", fingerprint="fp"))
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite")]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 100
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite"), "--wide"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) > 100 and "arithmetic" in out and "a-model-with-a-long-name" in out


def test_runs_prints_a_compact_table_csv_and_json(tmp_path, capsys):
    import json

    from moeviz.runs import Run, RunStore

    store = RunStore(tmp_path / "runs.sqlite")
    store.add(Run("demo", "original", 0.0, {"perplexity": 14.0, "perplexity_se": 0.5, "kl": 0.0}, fingerprint="fp"))
    store.add(Run("demo", "mone", 0.25, {"perplexity": 17.5, "perplexity_se": 0.6, "kl": 0.8}, "novice", "layer",
                  fingerprint="fp"))
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "mone novice 25 %" in out and "17.5 ± 0.6" in out and "+3.5" in out
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite"), "--csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].startswith("id,model,run,evaluated_on") and "perplexity,perplexity_se" in csv[0]
    assert ",17.5,0.6," in csv[2]  # numbers, the standard error in a column of its own
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["metrics"]["kl"] == 0.8
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite"), "--delete", "2"]) == 2  # no terminal, no --yes
    assert "needs a yes" in capsys.readouterr().err and len(store.list()) == 2
    assert main(["runs", "--runs", str(tmp_path / "runs.sqlite"), "--delete", "2", "--yes"]) == 0
    assert len(store.list()) == 1


@pytest.mark.parametrize("args, message", [
    (["--methods", "mone,magic"], "Unknown method 'magic'"),
    (["--methods", "mone:sideways"], "Unknown mode 'sideways'"),
    (["--ratios", "0.25,half"], "--ratios must be numbers"),
    (["--ratios", "1.5"], "--ratios must be in [0, 1)"),
])
def test_sweep_checks_every_argument_before_any_work(args, message, tmp_path, capsys):
    from moeviz.calibrate import CalibConfig, calibrate

    _, path = calibrate(tiny_model("olmoe"), CalibConfig(data="random", num_samples=2, seq_len=8, probe_tokens=0,
                                                          cache_dir=tmp_path))
    assert main(["sweep", "--model", "./not/loaded", "--stats", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_plans_from_a_mix_of_calibrations(tiny_dir, tmp_path, capsys):
    """--stats A,B --mix 1,0 is the plan of A alone; a mix is recorded in the plan and used by
    prune without --stats; bad mixes are one line each."""
    from moeviz.calibrate import CalibConfig, calibrate
    from moeviz.plan import PruningPlan

    model = tiny_model("olmoe")
    a, b = (str(calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, seed=seed,
                                            cache_dir=tmp_path / "cache"))[1]) for seed in (0, 1))
    plans = {}
    for name, args in (("a", ["--stats", a]), ("a10", ["--stats", f"{a},{b}", "--mix", "1,0"]),
                       ("b", ["--stats", b]), ("even", ["--stats", f"{a},{b}"])):
        assert main(["plan", *args, "--method", "reap", "--ratio", "0.5", "--out", str(tmp_path / f"{name}.json")]) == 0
        plans[name] = PruningPlan.load(tmp_path / f"{name}.json")
    assert plans["a10"].pruned == plans["a"].pruned != plans["b"].pruned
    assert [m["share"] for m in plans["even"].mix] == [0.5, 0.5] and plans["even"].mix[1]["path"] == b
    capsys.readouterr()
    assert main(["plan", "--stats", f"{a},{b}", "--mix", "1,0", "--method", "mone", "--out",
                 str(tmp_path / "mone.json")]) == 0
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(tmp_path / "mone.json"),  # its mix, recorded
                 "--out", str(tmp_path / "pruned")]) == 0
    capsys.readouterr()
    for mix, message in (("1,-1", "non-negative and not all zero"), ("0,0", "non-negative and not all zero"),
                         ("1", "gives 1 shares for 2 stats directories"), ("1,x", "numbers separated by commas")):
        assert main(["plan", "--stats", f"{a},{b}", "--mix", mix, "--method", "reap", "--out",
                     str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "bad.json").exists()


def test_bad_arguments_are_refused_before_any_work_in_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    cases = [
        (["prune", "--model", str(tiny_dir), "--sequential", "--ratio", "1.5", "--data", "random",
          "--out", str(tmp_path / "p")], "--ratio is a fraction"),
        (["calibrate", "--model", str(tiny_dir), "--data", "random", "--sequential-sparsity", "1.5"],
         "--sequential-sparsity is a fraction"),
        (["distill", "--model", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "d")], "No such directory"),
        (["distill", "--model", str(tiny_dir), "--teacher", str(tiny_dir), "--out", str(tmp_path / "full")],
         "is a directory that is not empty"),
        (["prune", "--model", str(tiny_dir), "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path / "full")],
         "is a directory that is not empty"),
        (["info", "--model", "demo_fine"], "did you mean 'demo-fine'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)  # no traceback, no progress bar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_prune_refuses_a_model_without_experts_before_saying_anything(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert main(["prune", "--model", str(tmp_path / "gpt2"), "--plan", str(plan), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "Unsupported architecture" in err and "exporting as" not in err and not (tmp_path / "o").exists()


def test_an_export_evaluated_against_its_original_is_stored_as_a_run_of_its_plan(tmp_path, capsys):
    from moeviz.runs import RunStore

    assert main(["calibrate", "--model", "demo", "--data", "demo", "--samples", "4", "--seq-len", "32",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    stats_dir = capsys.readouterr().out.strip().splitlines()[-1]
    plan = tmp_path / "plan.json"
    assert main(["plan", "--stats", stats_dir, "--method", "frequency", "--ratio", "0.25", "--out", str(plan)]) == 0
    assert main(["prune", "--model", "demo", "--plan", str(plan), "--out", str(tmp_path / "pruned")]) == 0
    runs = tmp_path / "runs.sqlite"
    assert main(["evaluate", "--model", str(tmp_path / "pruned"), "--reference", "demo", "--runs", str(runs),
                 "--samples", "4", "--seq-len", "32", "--tasks", "none"]) == 0
    assert "stored as run" in capsys.readouterr().err
    stored = {r.method: r for r in RunStore(runs).list()}
    assert set(stored) == {"original", "frequency"} and stored["frequency"].metrics["kl"] > 0
    assert stored["frequency"].fingerprint == stored["original"].fingerprint  # compared with the demo's own runs
