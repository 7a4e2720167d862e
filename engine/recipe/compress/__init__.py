"""Compression: importance scores, structured pruning on the tensors, distillation losses.

    imp = compute_importance("activation", teacher, calibration_batches)
    sel = select(imp, teacher.config, PruneTarget(kv_channels=16, ffn_hidden_size=344))
    student_cfg, student_state = prune_state_dict(teacher.state_dict(), teacher.config, sel)
    loss = DistillLoss(teacher, DistillConfig(), proj)   # the Trainer's: loss.forward_step

Files: structure.py (where structures live in the fused tensors), importance.py,
prune.py (selection + slicing), search.py (paper rule, parameter budgets), export.py
(checkpoint in/out), distill.py (losses), distill_run.py (the Trainer wiring, any pp x dp).
"""
from engine.recipe.compress.distill import DistillConfig, DistillLoss, distill_loss, make_projection
from engine.recipe.compress.importance import METHODS, Importance, compute_importance
from engine.recipe.compress.prune import (PruneTarget, Selection, full_selection, prune_model,
                                   prune_state_dict, select)
from engine.recipe.compress.search import non_embedding_params, paper_target, search_target

__all__ = ["DistillConfig", "DistillLoss", "distill_loss", "make_projection", "METHODS",
           "Importance", "compute_importance", "PruneTarget", "Selection", "full_selection",
           "prune_model", "prune_state_dict", "select", "non_embedding_params",
           "paper_target", "search_target"]
