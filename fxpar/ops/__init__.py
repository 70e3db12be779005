"""The op vocabulary of per-rank programs: the functions that generated code calls in place of an
ATen op or between two placements, with their backward, and the communicator interface they call.

Nothing here binds to processes: an op asks ``context.current()`` for the communicator of its
mesh dimension, and ``fxpar.runtime`` supplies one over ``torch.distributed`` (or threads, or
shapes only). Passes and rules refer to these functions as call targets and import this layer
only; the import rules are checked by ``tests/test_layering.py``.

* ``collectives``: changes of placement (all-reduce, all-gather, shard, reduce-scatter, ...);
* ``local``: per-rank replacements of ATen ops (vocab-parallel embedding and cross-entropy,
  partial means, dropout drawn from the right random stream);
* ``experts``: the all-to-all dispatch and combine of expert parallelism;
* ``ring``: ring attention over the cp ranks;
* ``collective_matmul``: sequence parallelism's gathers and reduce-scatters fused with their
  linears, overlapped with them;
* ``async_collectives``: collectives split into a start and a wait;
* ``deferred``: matmuls whose weight gradients wait for a zero-bubble schedule's W;
* ``context``: the rank a program runs as, its communicators and random streams;
* ``comm``: the communicator interface.
"""
