"""The web portal at `/`: server-rendered pages (Jinja2) with htmx, on the service's own API.

Pages are shells with no tenant data; everything a tenant owns arrives through `/portal/...`
fragments or straight from `/v1`, both behind the same key check and organization filter as
every API route (the fragments call the API's own route functions). The key lives in the
browser's session storage and travels in the Authorization header, never in a cookie or a URL,
so a page from another site cannot make a request on the user's behalf (no CSRF token needed).
Every script, style and font ships in `static/` (no CDN)."""
