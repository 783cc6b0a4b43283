"""The TorchServe side of the model: request decoding (preprocessing) and the handler class."""
