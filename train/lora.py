"""LoRA supervised fine-tuning on chat records: recipe -> adapter artifact.

Invariant: the output folder is a PEFT adapter that vLLM and PEFT load as-is, plus `artifact.json` (kind
"lora") naming the base model and its digest, the training data digest and the measured eval loss; it is
written atomically, after training, so a failed or killed run leaves no partial adapter (checkpoints for
`--resume` live in the separate work folder).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from pydantic import BaseModel

from core.artifact import (
    DataInfo,
    ManifestDraft,
    Quality,
    SourceModel,
    check_destination,
    folder_digest,
    texts_digest,
    tool_versions,
    write_artifact,
)
from core.models import load_causal_lm, load_tokenizer, read_config, resolve_model_dir
from train.checkpoint import gather_trainable, is_sharded
from train.config import LoraRecipe
from train.data import ChatData, collate, load_chat_jsonl, pad_token_id
from train.loop import TrainTask, causal_lm_loss_sum, make_accelerator, train
from train.memory import DEFAULT_LORA_TARGETS, MemoryEstimate, estimate_memory
from train.report import LOG_NAME, PLOT_NAME

log = logging.getLogger(__name__)


class LoraResult(BaseModel):
    output: Path
    steps: int
    eval_loss: float
    eval_loss_initial: float | None
    train_records: int
    eval_records: int
    skipped_records: list[str]
    stopped_early: bool
    alerts: list[dict[str, Any]]  # loss spikes, skipped non-finite steps, rollbacks (see train.monitor)
    memory: dict[str, Any]  # gradient checkpointing on/off, peak and estimated memory (train.loop)


def default_work_dir(output: Path) -> Path:
    """Where checkpoints and logs of a run writing `output` live (a sibling, so `--resume` finds them)."""
    return output.parent / f"{output.name}.work"


def _split(data: ChatData, eval_data: ChatData | None, every: int) -> tuple[ChatData, ChatData]:
    if eval_data is not None:
        return data, eval_data
    held = [i for i in range(len(data.examples)) if i % every == every - 1]
    if not held:
        held = [len(data.examples) - 1]
    train_idx = [i for i in range(len(data.examples)) if i not in set(held)]
    pick = lambda idx: ChatData([data.examples[i] for i in idx], [data.texts[i] for i in idx])  # noqa: E731
    return pick(train_idx), pick(held)


def _memory_estimate(model: Path, recipe: LoraRecipe, data: ChatData) -> MemoryEstimate | None:
    """train.memory's prediction at the longest training conversation (None where it cannot model the
    target modules)."""
    targets = tuple(recipe.lora.target_modules)
    if not set(targets) <= set(DEFAULT_LORA_TARGETS) or not data.examples:
        return None
    return estimate_memory(
        read_config(model),
        method="lora",
        seq_len=max(len(e.input_ids) for e in data.examples),
        batch=recipe.loop.batch_size,
        lora_rank=recipe.lora.rank,
        lora_targets=targets,
    )


def train_lora(
    model: Path,
    data: Path,
    output: Path,
    recipe: LoraRecipe,
    *,
    eval_data: Path | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> LoraResult:
    """Fine-tune a LoRA adapter on `data` and write the adapter artifact to `output`."""
    from peft import LoraConfig, get_peft_model

    model = resolve_model_dir(model)
    check_destination(output, overwrite=overwrite)
    tokenizer = load_tokenizer(model)
    cfg = recipe.data
    records = load_chat_jsonl(data, tokenizer, max_length=cfg.max_length, on_bad=cfg.on_bad_record)
    held_out = (
        load_chat_jsonl(eval_data, tokenizer, max_length=cfg.max_length, on_bad=cfg.on_bad_record)
        if eval_data is not None
        else None
    )
    train_set, eval_set = _split(records, held_out, cfg.heldout_every)
    set_seed(recipe.loop.seed)  # LoRA A matrices are initialised randomly: same seed, same adapter
    base = load_causal_lm(model, dtype=torch.float32)
    lora = recipe.lora
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    pad_id = pad_token_id(tokenizer)
    n_params = sum(p.numel() for p in peft_model.parameters())
    task = TrainTask(
        model=peft_model,
        loss_fn=causal_lm_loss_sum,
        train_data=train_set.examples,
        eval_data=eval_set.examples,
        collate=lambda examples: collate(examples, pad_id),
        flops_per_token=6.0 * n_params,
        memory_estimate=_memory_estimate(model, recipe, train_set),
    )
    work = work_dir or default_work_dir(output)
    if overwrite and not resume:  # a fresh run replacing an earlier output starts from no checkpoint
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    accelerator = make_accelerator()
    result = train(task, recipe.loop, work, resume=resume, accelerator=accelerator)
    # FSDP (version 2 shards the model in place) leaves each process a shard: gather the adapter weights
    # on the main process (a collective). Otherwise PEFT reads the complete parameters itself.
    adapter_state = gather_trainable(accelerator, peft_model) if is_sharded(accelerator) else None
    n_tokens = sum(len(e.input_ids) for e in train_set.examples)

    def populate(tmp: Path) -> ManifestDraft:
        peft_model.save_pretrained(str(tmp), state_dict=adapter_state)
        for name in (LOG_NAME, PLOT_NAME):
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / name)
        extra = {"eval_loss": result.final_eval_loss, "best_eval_loss": result.best_eval_loss}
        if result.initial_eval_loss is not None:
            extra["eval_loss_initial"] = result.initial_eval_loss
        if result.final_train_loss is not None:
            extra["train_loss"] = result.final_train_loss
        return ManifestDraft(
            kind="lora",
            source=SourceModel(path=str(model.resolve()), digest=folder_digest(model)),
            parameters={
                **lora.model_dump(),
                "loop": recipe.loop.model_dump(mode="json"),
                "steps": result.steps,
            },
            data=DataInfo(
                name=str(data),
                digest=texts_digest(train_set.texts),
                num_samples=len(train_set.examples),
                num_tokens=n_tokens,
            ),
            quality=Quality(
                eval_data=DataInfo(
                    name=str(eval_data or f"{data} (every {cfg.heldout_every}th record)"),
                    digest=texts_digest(eval_set.texts),
                    num_samples=len(eval_set.examples),
                ),
                extra=extra,
            ),
            tool_versions=tool_versions("torch", "transformers", "peft", "accelerate"),
        )

    if PartialState().is_main_process:  # one writer under accelerate launch / torchrun
        write_artifact(output, populate, overwrite=overwrite)
        log.info("adapter written to %s (eval loss %.4f)", output, result.final_eval_loss)
    PartialState().wait_for_everyone()
    return LoraResult(
        output=output,
        steps=result.steps,
        eval_loss=result.final_eval_loss,
        eval_loss_initial=result.initial_eval_loss,
        train_records=len(train_set.examples),
        eval_records=len(eval_set.examples),
        skipped_records=records.problems + (held_out.problems if held_out else []),
        stopped_early=result.stopped_early,
        alerts=result.alerts,
        memory=result.memory,
    )
