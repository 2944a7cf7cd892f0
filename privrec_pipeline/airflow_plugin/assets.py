"""The Data Docs' scripts, styles and fonts, served by the plugin instead of public CDNs.

Great Expectations' Data Docs load bootstrap, jQuery, bootstrap-table, Font Awesome and Vega
from CDNs and their logo from Great Expectations' own web-assets bucket (with the data
context's id in the URL): offline the pages show no tables or charts, and online every view
tells a third party that someone opened a report. The plugin serves the same files instead:

- the npm packages of the exact versions the Data Docs name, pinned in ``assets/package.json``
  and ``package-lock.json`` (integrity-checked by npm) and installed by ``make setup`` (or
  ``npm ci --prefix privrec_pipeline/airflow_plugin/assets``; the Docker image does the same);
  served at ``/privrec/assets/npm/<package>/<file>``;
- Great Expectations' own images from its installed package, at ``/privrec/assets/ge/<file>``.

``rewrite_cdn`` turns the CDN addresses of an HTML page into relative addresses of those
routes (relative, so a proxy's path prefix in front of the API server keeps working). Files
are byte-identical to the CDNs' (the Data Docs' subresource-integrity hashes still match).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ASSETS_DIR = Path(__file__).with_name("assets")
# CDN address prefix -> the file or folder under node_modules that holds the same bytes.
CDN_FILES = {
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/build/vega-embed.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
}
CDN_FOLDERS = {
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/": "@fortawesome/fontawesome-free/",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/": "popper.js/dist/",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/": "bootstrap/dist/",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/": "bootstrap/dist/",
    "https://unpkg.com/bootstrap-table@1.19.1/": "bootstrap-table/",
    "https://unpkg.com/bootstrap-table@1.19.0/": "bootstrap-table-1.19.0/",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/": "bootstrap-datepicker/dist/",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/": "@forevolve/bootstrap-dark/",
}
GE_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".map": "application/json",
               ".woff2": "font/woff2", ".woff": "font/woff", ".ttf": "font/ttf", ".eot": "application/vnd.ms-fontobject",
               ".svg": "image/svg+xml", ".png": "image/png", ".gif": "image/gif", ".ico": "image/x-icon"}
# Only the packages the Data Docs load are served (not the rest of node_modules).
SERVED_PACKAGES = frozenset(p.split("/")[0] if not p.startswith("@") else "/".join(p.split("/")[:2])
                            for p in [*CDN_FILES.values(), *CDN_FOLDERS.values()])
_ADDRESS = re.compile(r"""(?P<q>["'])(?P<url>https://[^"'\s]+)(?P=q)""")


def node_modules() -> Path:
    """Where the npm packages are installed (``PRIVREC_ASSETS_DIR`` overrides, e.g. in an image)."""
    return Path(os.environ.get("PRIVREC_ASSETS_DIR") or ASSETS_DIR) / "node_modules"


def ge_images() -> Path:
    import great_expectations

    return Path(great_expectations.__file__).parent / "render" / "view" / "static" / "images"


def installed() -> bool:
    return all((node_modules() / f).is_file() for f in CDN_FILES.values())


def local_address(url: str) -> str | None:
    """The plugin route (relative to ``/privrec/assets/``) serving a CDN address, or None."""
    if url in CDN_FILES:
        return "npm/" + CDN_FILES[url]
    for prefix, folder in CDN_FOLDERS.items():
        if url.startswith(prefix) and "?" not in url and "#" not in url:
            return "npm/" + folder + url[len(prefix):]
    if url.startswith(GE_IMAGES):
        name = url[len(GE_IMAGES):].split("?")[0]  # drops the data context id the Data Docs append
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            return "ge/" + name
    return None


def rewrite_cdn(page: str, to_assets: str) -> str:
    """``page`` with every CDN address that the plugin serves replaced by ``to_assets`` (the
    relative path from the page to ``/privrec/assets/``) plus its route. Other addresses
    (links to web sites) are left as they are."""

    def swap(m: re.Match) -> str:
        local = local_address(m["url"])
        return m[0] if local is None else f"{m['q']}{to_assets}{local}{m['q']}"

    return _ADDRESS.sub(swap, page)


def external_resources(page: str) -> list[str]:
    """Addresses a browser would fetch from another host to show ``page`` (``src`` of scripts
    and images, ``href`` of stylesheets and icons)."""
    found = []
    for tag in re.finditer(r"<(script|img|link)\b[^>]*>", page, re.IGNORECASE):
        text = tag[0]
        if tag[1].lower() == "link" and not re.search(r"""rel=["']?(stylesheet|[a-z ]*icon)""", text, re.I):
            continue
        found += re.findall(r"""\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)""", text, re.IGNORECASE)
    return found
