"""Does DeepSpeed ZeRO train on CPU processes with this stack's torch? Prints per-step losses; asserts
nothing.

One process (no launcher): a tiny random Llama (the test model's shapes) trained `--steps` AdamW steps on
batch 4 of random token ids. Under `torchrun --nproc_per_node 2`: the same model, data and AdamW through
`deepspeed.initialize` with ZeRO stage `--stage` (2: optimizer states and gradients partitioned; 3: the
parameters too) over gloo, each process taking its half of every batch; the printed loss is the mean of the
processes' losses, so it equals the one-process loss when ZeRO computes the same update. `--lora` trains a
PEFT LoRA (rank 8, every projection) instead of every weight; `--gradient-checkpointing` checkpoints the
layers with `train`'s own `enable_gradient_checkpointing`.

DeepSpeed is not in the serving environment; the probe was run from a side folder (see docs/TRAINING.md):

    pip install --no-deps --no-build-isolation --target /tmp/ds-site deepspeed==0.19.8
    pip install --no-deps --target /tmp/ds-site hjson==3.1.0 msgpack==1.2.4
    export PYTHONPATH=/tmp/ds-site:$PWD DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    python -m bench.deepspeed_probe
    torchrun --nproc_per_node 2 -m bench.deepspeed_probe --stage 3 --lora --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

LR = 3e-3
BATCH = 4


def build(lora: bool, checkpointing: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: nn.Module = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))  # type: ignore[arg-type]
    if checkpointing:
        from train.activations import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=[2, 3], default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    model = build(args.lora, args.gradient_checkpointing).train()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (BATCH, 64), generator=generator) for _ in range(args.steps)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    if "WORLD_SIZE" not in os.environ:
        optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        print(json.dumps({"processes": 1, "losses": losses}))
        return

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_rank = BATCH // world
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10_000,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    for ids in batches:
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / world)
    if rank == 0:
        print(
            json.dumps(
                {
                    "processes": world,
                    "stage": args.stage,
                    "deepspeed": deepspeed.__version__,
                    "losses": losses,
                }
            )
        )


if __name__ == "__main__":
    main()
