"""Deployment: batch norm folded into the convs, and export to StableHLO, TF SavedModel, TFLite and ONNX, each
artifact checked in its own runtime."""
