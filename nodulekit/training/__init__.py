"""Training: what `nodulekit train` runs, from a cache to a run folder.

    config.py      the run's configuration (`TrainConfig`); the paper's and the demo's defaults
    loop.py        the training loop (`train`): setup, epochs of train steps, validate, save
    checkpoint.py  HDF5 checkpoints, written atomically, validated on reading
    runfiles.py    the run folder: log, metrics.csv, progress.png, config.json
    demo.py        the embedded synthetic data set of `nodulekit train` with no DATA

The step itself (forward, loss, backward, all-reduce, Adam) is `nodulekit.nn.TrainStep`;
validation and the final test run `nodulekit.evaluation`; data-parallel ranks come from
`nodulekit.distributed`.
"""
