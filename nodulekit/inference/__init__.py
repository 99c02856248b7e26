"""Inference: a trained model on new DICOM slices (`nodulekit predict`).

    predict.py   the command's steps: gather inputs -> load the network -> read slices and
                 truth masks -> run in batches (SlicePrediction per slice) -> write;
                 PredictOptions, PredictResult
    inputs.py    DICOM files / folders -> SliceInput (UniToChest-style output names, truth
                 mask paths: auto / folder / none); reading a slice's truth mask
    writers.py   per slice: PNG mask, overlay in the paper's Fig. 4 colours, probabilities
                 PNG; predictions.csv
    tiling.py    whole slices of any size through the U-Net: padded with air to a multiple
                 of 2**depth, tiled (with the network's reach as overlap) where memory
                 demands; the same logits as one pass (validation and `evaluate` use it too)
"""
