"""Timestep sharding over torch.distributed (no Lightning here).

reduce.py: the Reducer interface (LocalReducer: one process); distributed.py: DistributedReducer
over a time group; blocks.py: the split of T rows into K blocks; block_map.py and sampler.py: the
fixed-point map and the DEQ layer on one block (import them from their modules: they import
deqlit.deq, which imports this package).
"""
from deqlit.parallel.blocks import Block, block_of, time_blocks
from deqlit.parallel.distributed import DistributedReducer, init_time_group
from deqlit.parallel.reduce import LOCAL, LocalReducer

__all__ = ["Block", "block_of", "time_blocks", "DistributedReducer", "init_time_group", "LOCAL", "LocalReducer"]
