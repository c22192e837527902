"""A remote OpenAI-compatible server (vLLM, SGLang, another instance of this app) as the decoder: --backend-url."""
