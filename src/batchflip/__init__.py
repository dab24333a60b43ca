"""batchflip: paired testing of batch-conditioned refusal robustness in LLM serving."""

__version__ = "0.1.0"
