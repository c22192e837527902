"""The HTTP front door (our FastAPI app with gradio mounted, uvicorn, login and event limits, the upload sweeper) and
the process lifecycle (SIGTERM drain)."""
