"""Megatron-style tensor parallelism for the GLM, applied to a plain model by a function.

    mappings.py       autograd-aware collectives (copy/reduce, scatter/gather, sequence)
    layers.py         Column/RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
    cross_entropy.py  vocab-parallel cross-entropy (never forms [tokens, vocab])
    random.py         dropout RNG: same stream where replicated, per-rank where sharded
    parallelize.py    parallelize(model, tp_group), the shard plan, full <-> TP tensors
"""
from engine.tensor_parallel.cross_entropy import (vocab_parallel_cross_entropy,
                                                  vocab_parallel_linear_cross_entropy)
from engine.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                           VocabParallelEmbedding, VocabParallelHead)
from engine.tensor_parallel.mappings import (all_gather_sequence, copy_to_region,
                                             copy_to_replicas, gather_last_dim,
                                             reduce_from_region, reduce_scatter_sequence,
                                             scatter_last_dim, scatter_to_sequence)
from engine.tensor_parallel.parallelize import (ShardPlan, gather_full_state_dict,
                                                gather_full_tensors, parallelize,
                                                shard_state_dict)
from engine.tensor_parallel.random import RNGTracker, TP_RNG, seed_tensor_parallel, tp_rng_seed

__all__ = [
    "ColumnParallelLinear", "RNGTracker", "RowParallelLinear", "ShardPlan", "TP_RNG",
    "VocabParallelEmbedding", "VocabParallelHead", "all_gather_sequence", "copy_to_region",
    "copy_to_replicas", "gather_full_state_dict", "gather_full_tensors", "gather_last_dim",
    "parallelize", "reduce_from_region", "reduce_scatter_sequence", "scatter_last_dim",
    "scatter_to_sequence", "seed_tensor_parallel", "shard_state_dict",
    "tp_rng_seed", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
]
