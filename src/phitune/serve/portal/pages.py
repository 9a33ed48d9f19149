"""The portal's pages: shells that hold no tenant data (that comes through the fragments and the
API, behind the key), the vendored scripts and styles, and FastAPI's API docs served from the
same vendored copy of Swagger UI instead of a CDN."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

from phitune.serve.portal import fragments
from phitune.serve.portal.render import STATIC, html

router = APIRouter(include_in_schema=False)
PAGES = {  # path -> (template, title, nav entry)
    "/": ("jobs.html", "Jobs", "jobs"),
    "/new": ("new_job.html", "New job", "new"),
    "/compare": ("compare.html", "Compare runs", "compare"),
    "/playground": ("playground.html", "Playground", "playground"),
    "/models": ("models.html", "Models", "models"),
    "/signin": ("signin.html", "Sign in", ""),
}
SECURITY_HEADERS = {
    # Scripts only from this server (no inline script, no CDN): a file's text can never run.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(template: str, title: str, nav: str):
    async def page(request: Request):
        return html(template, title=title, nav=nav, headers=SECURITY_HEADERS, query=dict(request.query_params))

    return page


for _path, (_template, _title, _nav) in PAGES.items():
    router.add_api_route(_path, _page(_template, _title, _nav), methods=["GET"], name=f"page:{_nav or 'signin'}")


@router.get("/jobs/{job_id}")
async def job_page(job_id: str):
    return html("job.html", title=f"Job {job_id}", nav="jobs", job_id=job_id, headers=SECURITY_HEADERS, query={})


@router.get("/docs")
async def api_docs():
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="phitune API",
        swagger_js_url="/static/swagger/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )


def mount(app: FastAPI) -> None:
    """The portal's pages, fragments and static files on the API's app (FastAPI's own CDN-loaded
    /docs and /redoc must be turned off where the app is made: `docs_url=None, redoc_url=None`)."""
    app.include_router(router)
    app.include_router(fragments.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
