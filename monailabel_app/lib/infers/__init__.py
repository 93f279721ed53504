"""Infer tasks: ``sam_2d`` (one slice per click) and ``sam_3d`` (one prompt, propagated)."""
