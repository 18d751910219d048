"""The model repository: the only contract between training and serving."""
