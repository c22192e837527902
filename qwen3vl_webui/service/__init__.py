"""The service the UI (and any front door) talks to: chats under one admission, the model manager, warm-up, prompts.
Never imports gradio."""
