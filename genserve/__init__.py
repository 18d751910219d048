"""genserve: generative and density models, trained in torch, served from ONNX over gRPC."""

__version__ = "0.1.0"
