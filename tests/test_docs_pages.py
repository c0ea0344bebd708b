"""`/docs` and `/redoc` work offline: every script, style, icon and spec they load comes from the server itself."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

# Where a page names something the browser loads: <link href>, <script src>, ReDoc's spec-url, Swagger's `url:`.
LOADED_URL = re.compile(r"""(?:href|src|spec-url)="([^"]*)"|\burl: '([^']*)'""")
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


def loaded_urls(page: str) -> list[str]:
    return [href or url for href, url in LOADED_URL.findall(page)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_page_loads_only_assets_this_server_serves(client: httpx.Client, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = loaded_urls(response.text)
    assert "/openapi.json" in urls and any(url.endswith(".js") for url in urls)
    assert not re.search(r"https?:|//[A-Za-z0-9]", response.text), "the page names another host"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        expected = CONTENT_TYPES[url[url.rindex(".") :]]
        assert expected in asset.headers["content-type"], (url, asset.headers["content-type"])


def test_swagger_ui_does_not_call_the_online_validator(client: httpx.Client) -> None:
    """Swagger UI's default validator loads a badge from validator.swagger.io; the page turns it off."""
    assert '"validatorUrl": null' in client.get("/docs").text


def test_the_pages_follow_a_root_path(tmp_path: Path) -> None:
    """Behind a proxy that mounts the app under a prefix (uvicorn `--root-path`), the page links under it."""
    app = create_app(Settings(data_dir=tmp_path))
    proxied = TestClient(app, root_path="/softserve")  # no lifespan: the pages need no model
    urls = loaded_urls(proxied.get("/docs").text)
    assert urls and all(url.startswith("/softserve/") for url in urls), urls
    assert all(proxied.get(url).status_code == 200 for url in urls)
