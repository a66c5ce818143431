"""Data stages: laminDB instance, ontologies, dataset listing and download, preprocessing,
the training collection, and the synthetic demo datasets."""
