"""The operator dashboard: static files under ``/dashboard``, data only from the REST API.

The static shell (HTML, JS, CSS, the vendored chart library) holds no data and needs no token;
everything it shows comes from ``/api/v1`` with the operator's Bearer token, so without a token
it can only show its login form. A strict Content-Security-Policy keeps the page to its own
origin: no inline scripts, no CDN, no third-party requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
DASHBOARD_PATH = "/dashboard"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate: a new release is picked up at once
}


def mount_dashboard(app: FastAPI) -> None:
    """Serve ``DASHBOARD_DIR`` at ``/dashboard/`` (``/`` redirects there)."""
    if not (DASHBOARD_DIR / "index.html").is_file():
        raise FileNotFoundError(f"dashboard files are missing: no {DASHBOARD_DIR / 'index.html'}")
    app.mount(DASHBOARD_PATH, StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{DASHBOARD_PATH}/")

    @app.middleware("http")
    async def security_headers(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.url.path.startswith(DASHBOARD_PATH):
            response.headers.update(SECURITY_HEADERS)
        return response
