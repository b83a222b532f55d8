"""kvcached: elastic, OS-style virtual memory for the KV caches of LLM serving engines.

Importing this package is cheap: it loads neither torch nor the compiled core.
"""

__version__ = "0.1.0"
