"""What binds a plan to processes: communicators over ``torch.distributed`` (and threads),
point-to-point sends, the pipeline executor, ``RankProgram`` and ``ParallelModule``
(``module.py``), with its parts in files of their own: binding to the mesh (``binding.py``), the
per-signature program cache (``programs.py``), clipping (``clipping.py``), full state and RNG
state (``state.py``), counters and traces (``telemetry.py``), batch splitting (``batches.py``).
The ops the per-rank programs call live in ``fxpar.ops``; which rank holds which part of which
tensor is ``fxpar.geometry``."""
