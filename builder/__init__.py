"""fvbuild: builds vLLM images that restore from a baked CRIU checkpoint instead of starting cold."""

__version__ = "0.1.0"
