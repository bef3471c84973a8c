"""`python -m train.cli` with FSDP on CPU processes, for tests only.

accelerate (1.15) turns an FSDP config into FSDP only on accelerators; on CPU processes (gloo) it silently
sets up DDP. torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so this launcher script upgrades
accelerate's CPU data-parallel state to FSDP, with the plugin accelerate builds from the `FSDP_*` variables
that `accelerate launch --config_file train/recipes/fsdp.yaml` sets, and then runs the real `train` CLI.
Everything after the state (model preparation, sharding, gathering) is accelerate's and torch's own code.
"""

from __future__ import annotations

import os

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if wanted and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_cpu_fsdp  # type: ignore[method-assign]

if __name__ == "__main__":
    from train.cli import main

    main()
