"""Datasets (MVTec AD layout, generic folders, the synthetic texture benchmark) and transforms."""
