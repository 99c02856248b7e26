"""Inference: a trained model on new DICOM slices (`nodulekit predict`).

    predict.py   DICOM slices -> PNG masks, overlays, probabilities, predictions.csv
"""
