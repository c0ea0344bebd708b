"""`/docs` (Swagger UI) and `/redoc`, with their scripts and styles served by this process.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so a server without internet access (or a
browser behind a strict proxy) shows a blank page. The assets come from the `fastapi-offline` package,
which ships the Swagger UI and ReDoc dist files (their licences: Apache-2.0 and MIT); the pages are
FastAPI's own, pointed at them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
# Swagger UI's default validator loads a badge from validator.swagger.io: off, so nothing leaves the server.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


Page = Callable[[str, str, str], HTMLResponse]  # (title, the OpenAPI URL, the assets' URL) -> the page


def swagger_ui(title: str, openapi_url: str, assets: str) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )


def redoc(title: str, openapi_url: str, assets: str) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=openapi_url,
        title=f"{title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


PAGES: dict[str, Page] = {"/docs": swagger_ui, "/redoc": redoc}


def install_docs(app: FastAPI) -> None:
    """Adds the pages and their assets. The app must be built with `docs_url=None, redoc_url=None`."""
    if app.docs_url is not None or app.redoc_url is not None or app.openapi_url is None:
        raise ValueError("build the app with docs_url=None and redoc_url=None (and an openapi_url)")
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    for url, page in PAGES.items():
        app.add_api_route(url, _serving(page, app.title, app.openapi_url), methods=["GET"], include_in_schema=False)


def _serving(page: Page, title: str, openapi_url: str) -> Callable[[Request], Awaitable[HTMLResponse]]:
    async def serve_page(request: Request) -> HTMLResponse:
        # The prefix a reverse proxy mounts the app under (`--root-path`), so the links work behind it.
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return page(title, root + openapi_url, root + ASSETS_URL)

    return serve_page
