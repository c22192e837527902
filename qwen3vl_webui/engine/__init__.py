"""The engine: a prompt and sampling parameters in, tokens out. Plain `generate` per request, or the batch engine
(engine/batch/), in this process or in its own (engine/remote/). Never imports gradio."""
