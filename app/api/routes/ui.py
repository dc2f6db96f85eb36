"""The operator's console: one HTML page at /ui, its ES modules and CSS under /ui/static (package files,
no build step), and a CJK font for Chinese label names. Nothing here needs the API key: the page asks
for it and sends it with every API call it makes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.services.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parents[2] / "ui" / "static"
# Everything the page loads comes from this server: the browser refuses anything else.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                           "script-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; "
                           "base-uri 'none'; frame-ancestors 'none'")
CJK_FONT_FILE = "NotoSansCJKsc-Regular.otf"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def console() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"})


@router.get("/ui/")
def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/fonts/cjk.otf")
def cjk_font() -> FileResponse:
    """Noto Sans CJK SC from the mplfonts package (a dependency already, for the report figures): the
    page's last fallback for Chinese text, fetched only by a browser without a CJK font of its own."""
    import mplfonts

    path = Path(mplfonts.__file__).parent / "fonts" / CJK_FONT_FILE
    if not path.is_file():
        raise NotFoundError("no CJK font is installed with mplfonts")
    return FileResponse(path, media_type="font/otf", headers={"Cache-Control": "max-age=604800"})


class _ConsoleFiles(StaticFiles):
    """The page's modules, revalidated on every load (ETag): an upgraded server is seen at once."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def add_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", _ConsoleFiles(directory=STATIC_DIR), name="ui-static")
