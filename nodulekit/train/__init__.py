"""Training, evaluation and prediction: what `nodulekit train | evaluate | predict` run.

    config.py      the run's configuration; the paper's and the demo's defaults
    trainer.py     the training loop (`train`), resuming, fine-tuning
    checkpoint.py  HDF5 checkpoints, written atomically, validated on reading
    metrics.py     per-slice and global Dice / IoU, the table by nodule diameter
    evaluate.py    a model over a split; summary.json (`evaluate`)
    predict.py     DICOM slices -> PNG masks, overlays, probabilities (`predict`)
    runfiles.py    the run folder: log, metrics.csv, progress.png, config.json
    demo.py        the embedded synthetic data set of `nodulekit train` with no DATA
"""
