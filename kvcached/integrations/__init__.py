"""Engine integrations: import-time patches for vLLM and SGLang, one module per version range."""
