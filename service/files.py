"""GET /files/<path>: the outputs LocalStorage keeps under STORAGE_DIR, for the dashboard and API."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, send_from_directory

from service.storage import InvalidObjectPath, check_path, storage_dir

bp = Blueprint("files", __name__)


@bp.get("/files/<path:path>")
def serve(path: str) -> Response:
    try:
        check_path(path)  # what LocalStorage could have written: no "..", no temp or hidden files
    except InvalidObjectPath:
        abort(404)
    response = send_from_directory(storage_dir(current_app.config), path)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
