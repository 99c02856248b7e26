"""Evaluation: a model over a split of a cache, scored per slice, by nodule diameter, and
per nodule in whole scans.

    metrics.py   per-slice and global Dice / IoU in three conventions, the table by nodule
                 diameter
    selection.py which epoch's model training keeps as checkpoint_best (validation scores)
    evaluate.py  `infer_split` (validation and test) and `evaluate` (summary.json)
    detection.py nodule-level results: truth nodules found, false positives, FROC, CPM
    exams.py     a split's exams as sparse volumes (rows, voxel spacing) for detection.py
"""
