"""What binds a plan to processes: communicators over ``torch.distributed`` (and threads),
point-to-point sends, the pipeline executor, ``RankProgram`` and ``ParallelModule``. The ops the
per-rank programs call live in ``fxpar.ops``."""
