"""``GET /``: the live dashboard, a single page served from package data.

The page (``patchserve/dashboard``: HTML, three small ES modules and a stylesheet, no build
step, nothing fetched from another origin) drives the JSON API of this same server: it
tokenizes with ``POST /tokenize``, streams ``POST /v1/patch_sweep`` and lists stored runs.
It is outside ``/v1``, so it loads without an API key; the page asks for the key when an API
call answers 401.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

#: The page's files, inside the installed package.
DASHBOARD_DIR = Path(str(files("patchserve") / "dashboard"))
#: Where the page's scripts and stylesheet are served.
STATIC_PREFIX = "/dashboard"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard() -> FileResponse:
    """The dashboard page (no-cache: a new version of the server serves its new page)."""
    return FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's scripts and stylesheet, mounted at :data:`STATIC_PREFIX`."""
    return StaticFiles(directory=DASHBOARD_DIR)
