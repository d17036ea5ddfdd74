"""radio-distill: AM-RADIO style multi-teacher distillation from a cached Zarr store."""

__version__ = "0.1.0"
