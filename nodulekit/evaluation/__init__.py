"""Evaluation: a model over a split of a cache, scored per slice and by nodule diameter.

    metrics.py   per-slice and global Dice / IoU in three conventions, the table by nodule
                 diameter
    selection.py which epoch's model training keeps as checkpoint_best (validation scores)
    evaluate.py  `infer_split` (validation and test) and `evaluate` (summary.json)
"""
