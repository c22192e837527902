"""The gradio page: layout, handlers, panels, and every use of gradio internals (gradio_compat). Never imports torch."""
