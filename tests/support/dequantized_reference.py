"""Reference outputs of transformers' dequantized model for a W4A16 artifact (runs in the toolchain env).

Usage (what tests/e2e/test_quantized_serving.py runs with `LLMSTACK_QUANT_PYTHON`)::

    python -m tests.support.dequantized_reference OUT.json ARTIFACT... --prompt TEXT... --tokens N

writes to OUT.json (not stdout: the libraries print there) `{artifact path: [case, ...]}`, one case per
prompt: `prompt_ids`, `greedy_ids` (transformers' greedy continuation, up to N tokens or the end-of-sequence
token), and per generated position `greedy_logprobs` (the chosen token's log-probability), `top_logprobs`
(the K best, best first) and `margins` (best minus second best: where that is below the comparison
tolerance, "greedy tokens equal" would be a coin toss, so the test stops comparing there).

The model is the artifact as transformers loads it, with every quantized linear replaced by a dense float32
`nn.Linear` holding the weight its own library dequantizes: compressed-tensors through transformers'
`CompressedTensorsConfig(dequantize=True)`, the classic gptq/awq formats through gptqmodel's modules
(`dequantize_weight` / `awq_weight_dequantize`, with their fp16 scales upcast first so that the reference is
exact in float32), NF4 through bitsandbytes' `dequantize_4bit`. Everything runs in float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def _dense(module: Any) -> torch.nn.Linear:
    """A float32 `nn.Linear` with the dequantized weight of one gptqmodel or bitsandbytes quantized linear."""
    if hasattr(getattr(module, "weight", None), "quant_state"):  # bitsandbytes Linear4bit: [out, in]
        import bitsandbytes.functional as bnb

        weight = bnb.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    else:  # gptqmodel: [in, out]
        module.scales = module.scales.float()
        if hasattr(module, "awq_weight_dequantize"):
            weight = module.awq_weight_dequantize(device="cpu", dtype=torch.float32).t()
        else:
            weight = module.dequantize_weight().float().t()
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight.data = weight.contiguous()
    if module.bias is not None:
        linear.bias.data = module.bias.float()
    return linear


def dequantized_model(path: Path) -> torch.nn.Module:
    """The artifact as transformers loads it, every quantized linear replaced by its dense float32 weight."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    method = json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"]
    if method == "compressed-tensors":
        config = CompressedTensorsConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
        quantized = [
            (n, m)
            for n, m in model.named_modules()
            if hasattr(m, "qweight") or hasattr(getattr(m, "weight", None), "quant_state")
        ]
        if not quantized:
            raise SystemExit(f"{path}: no quantized linear found for method {method!r}")
        for name, module in quantized:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _dense(module))
        torch.nn.Module.float(model)  # transformers refuses `.float()` on a (formerly) quantized model
    packed = [
        n for n, p in model.named_parameters() if "packed" in n or "qweight" in n or p.dtype == torch.uint8
    ]
    not_fp32 = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if packed or not_fp32:
        raise SystemExit(f"{path}: not dequantized to float32: {(packed + not_fp32)[:3]}")
    return model.eval()


def reference(path: Path, prompts: list[str], tokens: int, top: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = dequantized_model(path)
    cases = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        case: dict[str, Any] = {"prompt_ids": ids, "greedy_ids": []}
        case.update(greedy_logprobs=[], top_logprobs=[], margins=[])
        with torch.inference_mode():
            for _ in range(tokens):
                sequence = ids + case["greedy_ids"]
                logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0, -1].float(), dim=-1)
                best = logprobs.topk(max(top, 2))
                case["greedy_ids"].append(int(best.indices[0]))
                case["greedy_logprobs"].append(float(best.values[0]))
                case["top_logprobs"].append(best.values[:top].tolist())
                case["margins"].append(float(best.values[0] - best.values[1]))
                if int(best.indices[0]) == tokenizer.eos_token_id:
                    break
        cases.append(case)
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    results = {str(path): reference(path, args.prompt, args.tokens, args.top) for path in args.artifacts}
    args.output.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
