"""Benchmarks (README, "Benchmarks"). Some import the handler in-process, which imports TorchServe's
BaseHandler: its optional back-ends (OpenVINO, onnxruntime, TensorRT), absent here and never used,
would each print a warning at import. Inside TorchServe the workers' log keeps them."""
import logging

logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)
