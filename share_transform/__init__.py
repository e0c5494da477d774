"""share_transform."""
__version__ = "0.1.0"
