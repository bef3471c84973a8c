"""Training memory and step time with and without gradient checkpointing, and the estimator's prediction for
each. Prints figures; asserts nothing.

Each (sequence length, checkpointing) cell runs in a fresh Python process, as
`tests/unit/train/test_memory.py` measures the estimator: it records its resident set after the imports,
loads the model in fp32 as `train` does, wraps it as the LoRA recipe does (`train/recipes/lora_chat.yaml`'s
rank 8, alpha 16, dropout 0.05 on the 7 projections) or trains it whole (`--method full`), turns on
checkpointing with `train`'s own `enable_gradient_checkpointing`, and runs `--steps` AdamW steps of batch
`--batch` on random token ids with the loop's loss (`causal_lm_loss_sum`). It reports the peak resident set
(VmHWM) above that baseline and the median wall and CPU time (this process's user + system seconds) of the
steps after the first; on a shared, loaded machine the CPU time is the stable figure (run with `--threads 1`
there, so no OpenMP thread spins waiting for a descheduled sibling). glibc's mmap threshold is pinned
(`MALLOC_MMAP_THRESHOLD_`) so freed tensors go back to the OS at once and the resident set follows live
tensors, not heap fragmentation. The prediction is
`train.memory.estimate_memory(...).predicted(gradient_checkpointing=...)`.

Usage: python -m bench.train_memory_bench [--model PATH] [--method lora|full] [--seq-lens 512,2048]
       [--batch 1] [--steps 3] [--threads N]   (default model: the embedded SmolLM2-135M)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CELL = """
import json, statistics, sys, time
import torch
from core.models import load_causal_lm
from train.activations import enable_gradient_checkpointing
from train.loop import causal_lm_loss_sum

model_dir, method, seq_len, batch, steps, checkpointing = sys.argv[1:7]
seq_len, batch, steps, checkpointing = int(seq_len), int(batch), int(steps), checkpointing == "1"

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

baseline = status("VmRSS")
torch.manual_seed(0)
model = load_causal_lm(model_dir, dtype=torch.float32).train()
if method == "lora":
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
layers = enable_gradient_checkpointing(model) if checkpointing else 0
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
times, cpu_times, losses = [], [], []
for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss, tokens = causal_lm_loss_sum(model, data)
    (loss / tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    losses.append(float(loss / tokens))
print(json.dumps({"peak": status("VmHWM") - baseline, "step_s": statistics.median(times[1:] or times),
                  "step_cpu_s": statistics.median(cpu_times[1:] or cpu_times),
                  "first_step_s": times[0], "losses": losses, "checkpointed_layers": layers}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_cell(
    model: Path, method: str, seq_len: int, batch: int, steps: int, checkpointing: bool, threads: int
) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    args = [str(model), method, str(seq_len), str(batch), str(steps), "1" if checkpointing else "0"]
    done = subprocess.run([sys.executable, "-c", CELL, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"cell {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from core.default_model import ensure_default_model
    from core.models import read_config
    from train.memory import estimate_memory

    model = args.model or ensure_default_model()
    config = read_config(model)
    print(
        f"# {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; model {model.name}; {args.method}"
    )
    print(f"# batch {args.batch}, {args.steps} steps per cell (step time: median after the first)")
    header = (
        "seq_len  checkpointing  peak_MiB  predicted_MiB  pred/meas  step_s  step_cpu_s  first_step_s  losses"
    )
    print(header)
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        estimate = estimate_memory(config, method=args.method, seq_len=seq_len, batch=args.batch)
        for checkpointing in (False, True):
            cell = run_cell(model, args.method, seq_len, args.batch, args.steps, checkpointing, args.threads)
            predicted = estimate.predicted(gradient_checkpointing=checkpointing)
            print(
                f"{seq_len:>7}  {'on' if checkpointing else 'off':>13}  {cell['peak'] / 2**20:>8.0f}  "
                f"{predicted / 2**20:>13.0f}  {predicted / cell['peak']:>9.2f}  {cell['step_s']:>6.2f}  "
                f"{cell['step_cpu_s']:>10.2f}  "
                f"{cell['first_step_s']:>12.2f}  {' '.join(f'{x:.4f}' for x in cell['losses'])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
