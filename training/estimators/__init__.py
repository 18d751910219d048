"""Density estimators, one module per family; the registry in ``training.registry`` names them."""
