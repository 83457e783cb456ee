"""Start-up time of the command line and of the library, against transformers' own.

    python bench/startup.py [--repeats 5]

Each line runs in a fresh interpreter, `--repeats` times; the table gives the fastest run (the
machine's other load only ever adds time) and its difference to `import transformers`.
`info --model demo` is compared with what transformers needs to read the same config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "moeviz" / "demo" / "checkpoint"

# (name, python arguments)
CASES = [
    ("python -c pass", ["-c", "pass"]),
    ("import transformers", ["-c", "import transformers"]),
    ("import transformers + AutoModelForCausalLM", ["-c", "from transformers import AutoModelForCausalLM"]),
    ("AutoConfig.from_pretrained(demo)",
     ["-c", f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(DEMO)!r})"]),
    ("import moeviz", ["-c", "import moeviz"]),
    ("import moeviz.cli", ["-c", "import moeviz.cli"]),
    ("moeviz --help", ["-m", "moeviz.cli", "--help"]),
    ("moeviz calibrate --samples 0 (an argument error)", ["-m", "moeviz.cli", "calibrate", "--samples", "0"]),
    ("moeviz runs (no runs stored)", ["-m", "moeviz.cli", "runs", "--runs", "{tmp}/none.sqlite"]),
    ("moeviz runs (one run stored)", ["-m", "moeviz.cli", "runs", "--runs", "{tmp}/runs.sqlite"]),
    ("moeviz info --model demo", ["-m", "moeviz.cli", "info", "--model", "demo"]),
]


def fastest(argv: list[str], repeats: int, cwd: str) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        times.append(time.perf_counter() - start)
    return min(times)


def store_one_run(path: Path) -> None:
    """A runs file holding one run, so that `moeviz runs` has a table to print."""
    sys.path.insert(0, str(ROOT))
    from moeviz.runs import Run, RunStore

    RunStore(path).add(Run(model="demo", method="original", ratio=0.0, metrics={"perplexity": 3.0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeviz-startup-") as tmp:
        store_one_run(Path(tmp) / "runs.sqlite")
        rows = [(name, fastest([a.format(tmp=tmp) for a in argv], args.repeats, tmp)) for name, argv in CASES]
    base = dict(rows)["import transformers"]
    print(f"\nfastest of {args.repeats} fresh interpreters, {sys.executable}\n")
    print("| what | seconds | − import transformers |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t - base:+.2f} |")


if __name__ == "__main__":
    main()
