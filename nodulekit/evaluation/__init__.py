"""Evaluation: a model over a split of a cache, scored per slice and by nodule diameter.

    metrics.py   per-slice and global Dice / IoU, the table by nodule diameter
    evaluate.py  `infer_split` (validation and test) and `evaluate` (summary.json)
"""
