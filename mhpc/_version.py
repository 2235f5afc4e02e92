"""The package version, in a leaf module (model files and exports record it; no import of the package's
public facade, ``mhpc/__init__.py``, is needed for it)."""

__version__ = "0.1.0"
