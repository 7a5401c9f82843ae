"""Parallelism, applied from outside the model: each builds the model parts a rank trains and
gives the one training loop (train/trainer.py) the same handful of operations.

`dist.py` process groups and DDP/FSDP2 wrapping, `data_parallel.py` a single process, DDP or
FSDP2, `pipeline.py` pipeline x data parallel (the (pp, dp) grid and the schedules),
`stages.py` cutting a CaptionModel into pipeline stages, `gather.py` a pipelined run's
optimiser state by parameter name, `router.py` the MoE router loads summed over ranks.
"""
