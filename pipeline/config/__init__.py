"""Typed, strict config: core.py (run, ray, mlflow, storage), one file per stage section, root.py (the whole)."""
