"""peftbench: one honest runner for the parameter-efficient fine-tuning papers' benchmarks."""

__version__ = "0.1.0"
