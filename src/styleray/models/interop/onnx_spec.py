"""The ONNX export's contract: opset, inputs, dynamic axis, check. Standard library only, so that
``styleray export --help`` states it without importing torch (``onnx_export`` does the work)."""

OPSET = 18  # default ONNX opset version
TOLERANCE = 1e-3  # largest |ONNX - PyTorch| allowed, on images in [-1, 1]: an eighth of one 8-bit level
CHECK_BATCHES = (1, 3)  # batch sizes the check runs (two sizes: the batch axis really is dynamic)
CHECK_PSI = (1.0, 0.7)  # truncation values the check runs
INPUTS = ("z", "psi", "c")  # c only for a conditional generator
OUTPUT = "img"
