"""What needs torch.distributed process groups (no Lightning here): the distributed reducer of a
time group (distributed.py), the time x data mesh (mesh.py) and joining a launched world
(launch.py). Everything that works on a block of the chain's rows with an injected reducer lives
in deqlit.deq (reduce.py, blocks.py): one process is the block that holds every row.
"""
