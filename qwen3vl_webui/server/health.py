"""GET /health and GET /ready on the app's own port, for Docker's HEALTHCHECK and Kubernetes' probes.

/health: 200 whenever this process serves HTTP (liveness). /ready: 200 only while the model is loaded and chats are
admitted, 503 before and while it loads, during a precision switch or an engine restart, and while draining
(readiness); its JSON says whether decode runs at full compiled speed. Both sit outside the login (a probe has no
credentials) and say nothing a visitor could not see on the page: no paths, no model source, no error text.
"""

from __future__ import annotations

from typing import Any

_NO_STORE = {"Cache-Control": "no-store"}


def build_router(service: Any) -> Any:
    """The two probes over `service` (ChatService), as a FastAPI router included before gradio's mount."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    from qwen3vl_webui.service.readiness import readiness

    router = APIRouter()

    @router.get("/health", include_in_schema=False)
    def health() -> JSONResponse:
        return JSONResponse({"status": "alive"}, headers=_NO_STORE)

    @router.get("/ready", include_in_schema=False)
    def ready() -> JSONResponse:
        state = readiness(service)
        return JSONResponse(state.body(), status_code=200 if state.ready else 503, headers=_NO_STORE)

    return router
