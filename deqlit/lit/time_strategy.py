"""The 'ddp_time' strategy: DDP on a data x time process mesh (deqlit.parallel.mesh).

world = data replicas x time shards (`time_shards`). Each time group solves one DEQ chain with its
T rows split over its processes (the LightningModule takes `strategy.time_reducer` for its
sampler); the DistributedSampler splits the data over the data group only, so the processes of a
time group see the same batch; gradients of what every time shard holds (weights, latents) are
summed over the time group and averaged over the data group, by one all_reduce over the world
divided by the number of replicas (a DDP communication hook, on CPU and GPU); metrics reduce over
the data group.

    trainer = Trainer(strategy=DDPTimeStrategy(time_shards=2), devices=4)   # data 2 x time 2
or, with the name registered here, Trainer(strategy="ddp_time") for time_shards = world size.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from deqlit.parallel.distributed import DistributedReducer
from deqlit.parallel.mesh import TimeMesh, build_time_mesh


def time_sum_data_mean_hook(data_replicas, bucket):   # no annotations: DDP checks them as types
    """DDP communication hook: all_reduce SUM over the world, divided by the data replicas
    (int, dist.GradBucket) -> torch.futures.Future of the reduced bucket."""
    buffer = bucket.buffer()
    buffer.div_(data_replicas)
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


class DDPTimeStrategy(DDPStrategy):
    """DDPStrategy with `time_shards` processes per data replica (None: the whole world)."""

    strategy_name = "ddp_time"

    def __init__(self, time_shards: Optional[int] = None, **kwargs: Any):
        if time_shards is not None and time_shards < 1:
            raise ValueError(f"time_shards must be >= 1, got {time_shards}")
        super().__init__(**kwargs)
        self.time_shards = time_shards
        self.mesh: Optional[TimeMesh] = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.mesh = build_time_mesh(self.time_shards or dist.get_world_size())

    @property
    def time_reducer(self) -> DistributedReducer:
        """The reducer of this process's time group (for DEQSampler / generate)."""
        if self.mesh is None:
            raise RuntimeError("the ddp_time mesh is built in setup_distributed (when the Trainer starts)")
        return self.mesh.time_reducer()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.mesh is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self.mesh.data, "rank": self.mesh.data_index}

    def configure_ddp(self) -> None:
        """DDP wraps the module only when it has a trainable parameter that DDP reduces: a module
        whose trainable tensors it all reduces itself (joint fine-tuning of the latents alone, with
        the network frozen) runs unwrapped, where DDP would refuse to start."""
        module = self.model
        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
        if any(p.requires_grad for name, p in module.named_parameters() if name not in ignored):
            super().configure_ddp()

    def _register_ddp_hooks(self) -> None:
        # Lightning registers communication hooks on CUDA only; this one is needed on any device.
        super()._register_ddp_hooks()
        if self.mesh is not None and self.model is not None:
            self.model.register_comm_hook(self.mesh.data, time_sum_data_mean_hook)

    def reduce(self, tensor: torch.Tensor, group: Optional[Any] = None,
               reduce_op: Optional[Union[dist.ReduceOp, str]] = "mean") -> torch.Tensor:
        """Metrics: reduce over the data group (the time shards of a replica agree already)."""
        if self.mesh is None or group is not None or not isinstance(tensor, torch.Tensor):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        return super().reduce(tensor, group=self.mesh.data_group, reduce_op=reduce_op)


if "ddp_time" not in StrategyRegistry:
    StrategyRegistry.register("ddp_time", DDPTimeStrategy,
                              description="DDP on a data x time mesh; time_shards processes per chain")
