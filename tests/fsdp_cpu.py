"""TEST ONLY, never used by conf/: FSDP on CPU, two gloo processes started with spawn.

Lightning refuses `FSDPStrategy` without a GPU accelerator (its check compares the strategy's
type exactly, so a subclass passes), and its FSDP launcher re-runs the command line, which under
pytest would be pytest itself. None of the FSDP code paths that matter here (wrapping, sharded
EMA, clipping, full weights for validation, full and sharded checkpoints) is device-specific, so
this strategy lets the tests run them on the CPUs every machine has.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from torch.nn import Module

from unclip.training.fsdp import UnclipFSDPStrategy, fsdp_strategy


class CPUTestFSDPStrategy(UnclipFSDPStrategy):
    """FSDPStrategy on CPU (gloo), its processes spawned like `ddp_spawn`. Tests only."""

    def _configure_launcher(self) -> None:
        self._launcher = _MultiProcessingLauncher(self, start_method="spawn")

    def _setup_model(self, model: Module) -> Module:
        # torch's FSDP takes CPU only when told so (device_id); Lightning passes a CUDA index
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn
        return super()._setup_model(model)


def cpu_test_fsdp_strategy(**kwargs: Any) -> FSDPStrategy:
    """conf/strategy/fsdp.yaml's arguments, on CPU: `strategy._target_=fsdp_cpu.cpu_test_fsdp_strategy`."""
    return fsdp_strategy(**kwargs, strategy_class=CPUTestFSDPStrategy)
