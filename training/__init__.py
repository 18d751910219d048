"""Training side of genserve: estimators, datasets, export to the model repository."""
