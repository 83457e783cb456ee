"""`moeviz verify`: an export checked where it will be served.

First its files (`moeviz.filecheck`): a broken copy is named in one line before any model is
built. Then an engine (stock transformers, vLLM through its offline API, or `moeviz.load_model`,
run by `moeviz/engine.py` in this Python or another one) continues a few held-out prompts
greedily, and its tokens and log-probabilities are compared with moeviz's intended model: the plan
applied in place on the original the lineage names, when it is on this machine, or else
`moeviz.load_model` of the export (the result says which; moeviz's engine against moeviz's own
reading of the same files is "consistent", not "verified"). The result goes into the lineage and
the card.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from .card import with_verification
from .checkpoint import demo_names, fingerprint, local_dir
from .export import CARD_FILE, write_atomically
from .filecheck import check_files
from .plan import LINEAGE_FILE, MOEVIZ_ONLY, SUBSTITUTION, PruningPlan, read_lineage
from .reload import is_pruned_export

ENGINES = ("transformers", "vllm", "moeviz")
ENGINE_SCRIPT = Path(__file__).with_name("engine.py")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.15}  # nats of log-probability
VLLM_CPU = dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0")


class VerifyError(ValueError):
    """The export cannot be verified as asked (no engine there, no prompts to give it)."""


# ---- an engine against moeviz's intended model ------------------------------------------------
@dataclass
class Verification:
    engine: str
    version: str | None
    device: str
    reference: str  # what the engine was compared with
    rows: list[dict] = field(default_factory=list)  # per prompt: tokens equal, largest difference
    tolerance: float = 0.0
    error: str | None = None  # why there are no rows: the engine's message, with what to do
    refused: bool = False  # the error is the engine refusing the checkpoint (not memory, not an import)
    independent: bool = True  # the reference is not the engine's own reading of the same files

    @property
    def ok(self) -> bool:
        return self.error is None and all(r["equal"] and r["diff"] <= self.tolerance for r in self.rows)

    def summary(self) -> str:
        where = f"{_ENGINE_NAMES[self.engine]} {self.version or ''}".strip() + f" ({self.device})"
        if self.error:
            return f"{'Refused by' if self.refused else 'Could not run in'} {where} on {date.today()}: {self.error}"
        equal = sum(r["equal"] for r in self.rows)
        diff = max((r["diff"] for r in self.rows), default=0.0)
        verdict = ("Verified" if self.independent else "Consistent") if self.ok else "Differs"
        return (f"{verdict} in {where} on {date.today()}: {equal}/{len(self.rows)} prompts equal, largest log-prob "
                f"difference {diff:.2g} (tolerance {self.tolerance:g}), against {self.reference}")


_ENGINE_NAMES = dict(transformers="transformers", vllm="vLLM", moeviz="moeviz.load_model")


def default_engine(path) -> str:
    """The engine that serves this kind of export: stock transformers a standard one, moeviz the rest."""
    return "moeviz" if is_pruned_export(path) else "transformers"


def verify(path, engine: str | None = None, python: str | None = None, data: str | None = None,
           num_prompts: int = 5, prompt_tokens: int = 32, new_tokens: int = 16, device: str = "auto",
           tolerance: float | None = None, model=None, progress=None, device_map: str | None = None,
           tp: int = 1) -> Verification:
    """Run `engine` on the export at `path` and compare it with moeviz's intended model (see the
    module's docstring); `model`, when given, is the original already loaded (the dashboard's
    backend holds it). The files are checked first: `VerifyError` lists what is wrong.
    `device_map="auto"` spreads the intended model and a transformers engine over all GPUs, `tp`
    is vLLM's tensor-parallel size."""
    say = progress or (lambda text: None)
    path = Path(path).expanduser().resolve()
    say("Checking the files and their checksums")
    notes: list[str] = []
    if problems := check_files(path, notes):
        raise VerifyError("\n".join(problems))
    for note in notes:
        say(f"note: {note}")
    lineage = read_lineage(path) or {}
    if "files" not in lineage:
        say("No checksums in the lineage (not moeviz's export, or written before moeviz kept them): the files "
            "were checked against their config" + (" and plan" if lineage else "") + " only")
    engine = engine or default_engine(path)
    if engine not in ENGINES:
        raise VerifyError(f"Unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    prompts = held_out_prompts(path, lineage, data, num_prompts, prompt_tokens)
    say(f"The intended model: {num_prompts} prompts of {prompt_tokens} tokens, {new_tokens} more each")
    reference, how, dtype = intended(path, lineage, prompts, new_tokens, device, model, device_map)
    say(f"{_ENGINE_NAMES[engine]} on the export")
    got = run_engine(path, engine, prompts, new_tokens, python, device, str(dtype).removeprefix("torch."),
                     device_map, tp, say)
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 0.15)
    result = Verification(engine, got.get("version"), got.get("device", "?"), how, tolerance=tol,
                          independent=not (engine == "moeviz" and how.startswith("moeviz.load_model")))
    if "error" in got:
        result.refused, result.error = explain_failure(path, engine, got)
    else:
        result.rows = compare(prompts, reference, got, tol)
    if result.error is None or result.refused:  # out of memory or a broken install says nothing of the export
        try:
            record(path, result)
        except OSError as err:
            say(f"The result is not recorded in {path} ({err})")
    return result


def held_out_prompts(path: Path, lineage: dict, data: str | None, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens from the held-out split of `data`, by default the text the
    plan was calibrated on (the lineage names it; the export's own tokenizer turns it into tokens)."""
    from .data import sample_sequences

    config = json.loads((path / "config.json").read_text())
    data = data or lineage.get("data") or _calibration_data(lineage)
    if data is None:
        raise VerifyError("Name the prompts' text with --data: the lineage does not say what the plan was calibrated on.")
    tokenizer = None
    if any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return sample_sequences(data, n, length, tokenizer, 4321, split="heldout", vocab_size=vocab).tolist()


def _calibration_data(lineage: dict) -> str | None:
    """For exports older than the lineage's `data`: the plan's statistics, when they are on disk."""
    from .stats import plan_stats

    plan = PruningPlan(**lineage["plan"]) if lineage.get("plan") else None
    try:
        stats = plan_stats(plan) if plan else None
    except (FileNotFoundError, ValueError, OSError):
        stats = None
    if stats is not None:
        return stats.calibration_data
    return "demo" if lineage.get("parent") in demo_names() else None


def intended(path: Path, lineage: dict, prompts, new_tokens: int, device: str, model=None, device_map=None):
    """(greedy result, how it was made, dtype) of moeviz's intended model: the plan applied in
    place on the original, when it is on this machine (nothing is downloaded) and fits, or else
    `moeviz.load_model` of the export itself."""
    from .apply import applied
    from .building import DoesNotFit
    from .engine import greedy
    from .loading import load_model
    from .stats import plan_stats

    plan = PruningPlan(**lineage["plan"]) if lineage.get("plan") else None
    parent, why = lineage.get("parent"), None
    if plan is None:
        why = "it has no moeviz lineage"
    elif lineage.get("recovery"):
        why = "its weights were trained after pruning"
    elif model is None:
        if (original := local_original(parent)) is None:
            why = f"the original {parent} is not on this machine"
        elif fingerprint(original) != lineage.get("parent_fingerprint"):
            why = f"{original} is not the checkpoint it was exported from (its fingerprint differs)"
    if why is None:
        try:
            stats = plan_stats(plan)
        except (FileNotFoundError, OSError, ValueError):
            stats = None
        own = model is None
        try:
            if own:
                model = load_model(original, device=device, device_map=device_map)[0]
            with applied(model, plan, stats, lineage.get("parent_fingerprint")):
                result = greedy(model, prompts, new_tokens)
            return result, f"the plan applied in place on {parent}", next(model.parameters()).dtype
        except DoesNotFit as err:
            why = f"the original does not fit here ({str(err).split(':')[0]})"
        except ValueError as err:  # the plan needs statistics that are not at hand
            why = f"the plan cannot be applied in place here ({err})"
        finally:
            if own:  # freed before the engine starts: the GPU is the engine's now
                model = None
                _free()
    export = load_model(path, device=device, device_map=device_map)[0]
    result = greedy(export, prompts, new_tokens)
    dtype = next(export.parameters()).dtype
    del export
    _free()
    return result, f"moeviz.load_model of the export ({why})", dtype


def local_original(parent: str | None) -> str | None:
    """The original's directory when it is on this machine: a demo, a path, or a hub id already in
    the Hugging Face cache (never downloaded: on a serving machine it may be hundreds of GB)."""
    try:
        return local_dir(parent, download=False) if parent else None
    except (FileNotFoundError, ValueError):  # ValueError: not a hub id the hub would take
        return None


def gpu_room(needed: int, free: int, total: int, engine: str) -> str | None:
    """Why an engine cannot load an export of `needed` bytes beside a model already on the GPU
    (None: it can). vLLM starts only with 90 % of the GPU free (its default memory utilisation)."""
    if engine == "vllm" and free < 0.9 * total:
        return f"vLLM starts with 90 % of the GPU free, and {free / 2**30:.1f} of {total / 2**30:.1f} GiB are"
    if needed * 1.1 > free:
        return f"the export needs about {needed / 2**30:.1f} GiB of GPU memory, and {free / 2**30:.1f} GiB are free"
    return None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(path: Path, engine: str, prompts, new_tokens: int, python: str | None = None,
               device: str = "auto", dtype: str | None = None, device_map: str | None = None, tp: int = 1,
               say=lambda text: None) -> dict:
    """`moeviz/engine.py` in `python` (default this one): the engine's result, or its error; its
    log goes to `say` line by line. `dtype` is the intended model's, so that no engine casts a
    float32 checkpoint down."""
    request = dict(engine=engine, path=str(path), prompts=prompts, new_tokens=new_tokens, dtype=dtype,
                   device=None if device == "auto" else device, device_map=device_map, tp=tp)
    cpu_only = engine == "vllm" and not torch.cuda.is_available()  # vLLM's CPU build wants these
    env = {**VLLM_CPU, **os.environ} if cpu_only else dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        ask, answer = Path(tmp) / "request.json", Path(tmp) / "result.json"
        ask.write_text(json.dumps(request))
        run = subprocess.Popen([python or sys.executable, str(ENGINE_SCRIPT), str(ask), str(answer)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        last = ""
        for line in run.stderr:  # the engine's own log (vLLM loading a large model takes minutes): shown as it goes
            if line.strip():
                last = line.strip()
                say(f"  {engine}: {last[:200]}")
        run.wait()
        if not answer.is_file():
            raise VerifyError(f"{engine} could not be run by {python or sys.executable}: {last or f'exit status {run.returncode}'}")
        return json.loads(answer.read_text())


def explain_failure(path: Path, engine: str, got: dict) -> tuple[bool, str]:
    """(whether the engine refused the checkpoint, its own message and what to do about it). Out of
    memory and a broken install are failures of the machine, not refusals of the export."""
    said, version = got["error"], got.get("version")
    first = said.splitlines()[0][:400]
    kind = (read_lineage(path) or {}).get("kind")
    if "out of memory" in said.lower() or said.startswith("OutOfMemoryError"):
        return False, (f"{first} — out of memory: free the GPU (the dashboard's backend holds the original there; "
                       "`moeviz verify` from the command line frees it first), or spread the model (--tp, --device-map)")
    if engine == "vllm" and version is None:
        return False, f"{first} — vLLM is not installed there: name its Python with --python (see bench/serve.py)"
    if said.startswith(("ImportError", "ModuleNotFoundError")):
        return False, f"{first} — the engine could not be imported in that Python"
    if kind == MOEVIZ_ONLY or json.loads((path / "config.json").read_text()).get("model_type") == "moeviz_pruned":
        advice = "a moeviz-only export loads in moeviz alone: verify it with --engine moeviz"
    elif kind == SUBSTITUTION and engine == "vllm" and "expert_replacements" in said:
        advice = f"vLLM {version} has no expert substitution: use ≥ 0.33, or export with `--mode remove` for a standard checkpoint"
    elif kind == SUBSTITUTION and engine == "transformers":
        advice = ("stock transformers cannot load an expert substitution: verify with --engine vllm (≥ 0.33) or "
                  "--engine moeviz, or export with `--mode remove` for a standard checkpoint")
    else:
        advice = f"{_ENGINE_NAMES[engine]} cannot serve this checkpoint as it is"
    return True, f"{first} — {advice}"


def compare(prompts, reference: dict, got: dict, tolerance: float) -> list[dict]:
    """Per prompt: whether the engine's greedy tokens are the intended model's, and the largest
    log-probability difference over the tokens both share. A differing token counts as a tie (the
    prompt still equal) only where the engine took the intended model's runner-up and the top two
    lie within `tolerance`."""
    rows = []
    for i, prompt in enumerate(prompts):
        mine, theirs = reference["tokens"][i], got["tokens"][i]
        same = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        tie = (same < min(len(mine), len(theirs)) and theirs[same] == reference["runner_up"][i][same]
               and reference["margins"][i][same] <= tolerance)
        shared = len(prompt) - 1 + same
        diffs = [abs(a - b) for a, b in zip(reference["logprobs"][i][:shared], got["logprobs"][i][:shared])]
        rows.append(dict(equal=same == len(mine) == len(theirs) or tie, first_difference=None if same == len(mine)
                         == len(theirs) else same, diff=max(diffs, default=0.0)))
    return rows


# ---- the result, kept with the export ---------------------------------------------------------
def record(path: Path, result: Verification) -> None:
    """The result in the lineage (one entry an engine, the latest) and in the card's Verification section."""
    lineage = read_lineage(path)
    if lineage is None:
        return  # not moeviz's export: nothing of moeviz's to update
    lineage.setdefault("verifications", {})[result.engine] = dict(
        asdict(result), summary=result.summary(), ok=result.ok, date=date.today().isoformat())
    write_atomically(path / LINEAGE_FILE, json.dumps(lineage, indent=2))
    card = path / CARD_FILE
    if card.is_file():
        lines = [v["summary"] for v in lineage["verifications"].values()]
        write_atomically(card, with_verification(card.read_text(), lines))
