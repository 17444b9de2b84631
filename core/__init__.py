"""cardcore: the transaction core behind retail-chain member cards."""
__version__ = "0.1.0"
