"""Other formats of the same networks, in and out. Pure PyTorch (and onnx/onnxruntime for the export).

- ``nvidia_pickle``: NVIDIA's stylegan2-ada-pytorch network pickles read as plain data (class name, init
  arguments, state), without NVIDIA's code and without running anything stored in the file.
- ``nvidia_networks``: that plain data turned into styleray's model configuration and state dicts, every
  parameter and buffer accounted for.
- ``onnx_export``: the generator (mapping + synthesis, truncation and class as inputs) as ONNX, checked
  against PyTorch with onnxruntime; ``onnx_spec`` states its contract (opset, inputs, tolerance) without
  importing torch.
"""
