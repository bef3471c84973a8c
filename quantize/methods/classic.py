"""AWQ and GPTQ in the classic checkpoint formats (AutoAWQ `gemm`, AutoGPTQ `gptq`) through gptqmodel.

Invariant: the output folder holds what vLLM and transformers load as-is (int32 `qweight`/`qzeros`, 16-bit
`scales`, `quantization_config` in config.json with `quant_method` awq|gptq, tokenizer and chat template);
`lm_head` and the embeddings stay in the source dtype; every calibration sample the manifest records is used
(none dropped for length); nothing is written outside `out` (gptqmodel's own per-layer logs go to a
temporary folder). gptqmodel logs on stdout; the CLI diverts that to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.config import AwqConfig, GptqConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)
# gptqmodel's default on a GIL build is one CPU worker per two cores: use every core (at most its cap, 12).
CPU_WORKERS = str(min(12, os.cpu_count() or 1))


def quantize_config(config: AwqConfig | GptqConfig) -> Any:
    """gptqmodel's `QuantizeConfig` for `config`: AWQ asymmetric groups in the GEMM layout, GPTQ symmetric
    groups without activation reordering (`desc_act=False`: trivial `g_idx`, what every kernel runs)."""
    from gptqmodel import QuantizeConfig

    common: dict[str, Any] = {
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": False,
        "offload_to_disk": False,  # keep every intermediate in memory: nothing written outside `out`
    }
    if isinstance(config, AwqConfig):
        return QuantizeConfig(**common, sym=False, quant_method="awq", format="gemm")
    return QuantizeConfig(
        **common, sym=True, quant_method="gptq", format="gptq", damp_percent=config.dampening_frac
    )


def _backend(config: AwqConfig | GptqConfig, *, cuda: bool) -> Any:
    """gptqmodel's automatic kernel choice refuses AWQ without CUDA ("AWQ: CUDA is not available"); its
    pure-torch AWQ kernel runs anywhere."""
    from gptqmodel import BACKEND

    return BACKEND.AWQ_TORCH if isinstance(config, AwqConfig) and not cuda else BACKEND.AUTO


@contextlib.contextmanager
def _processor_logs_elsewhere() -> Iterator[None]:
    """gptqmodel's quantization loops append JSON logs to `./logs/` (relative to the working directory, on a
    background worker): point them into a temporary folder and let the writes drain before it is deleted."""
    from gptqmodel import DEVICE_THREAD_POOL
    from gptqmodel.looper import loop_processor

    original = loop_processor._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as folder:
        loop_processor._PROJECT_LOG_DIR = Path(folder)
        try:
            yield
        finally:
            DEVICE_THREAD_POOL.wait()
            loop_processor._PROJECT_LOG_DIR = original


def quantize(source: Path, out: Path, config: AwqConfig | GptqConfig, calibration: Dataset | None) -> None:
    """Quantize `source` with gptqmodel on the tokenized `calibration` samples and save into `out`."""
    import torch

    if calibration is None:
        raise ValueError("the classic formats are calibrated: calibration samples are required")

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", CPU_WORKERS)  # read once, when gptqmodel is imported
    from gptqmodel import GPTQModel

    cuda = torch.cuda.is_available()
    samples = calibration.to_list()  # [{"input_ids": [...], "attention_mask": [...]}, ...]
    model = GPTQModel.load(str(source), quantize_config(config), device="cuda" if cuda else "cpu")
    with _processor_logs_elsewhere():
        model.quantize(
            samples, batch_size=1, backend=_backend(config, cuda=cuda), calibration_data_min_length=1
        )
    model.save(str(out))
    log.info("wrote %s-format model to %s", "gemm AWQ" if isinstance(config, AwqConfig) else "GPTQ", out)
