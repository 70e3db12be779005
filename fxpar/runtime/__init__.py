"""What runs on each rank: communicators, collectives as graph-callable autograd functions,
parallel-aware ops (vocab-parallel embedding, dropout with RNG streams) and ``ParallelModule``."""
