"""The files a slide analysis writes, with their media types: one list for the CLI, the service's routes
and its OpenAPI document."""

GEOJSON = "analysis.geojson"
OVERLAY = "overlay.png"
SUMMARY = "summary.json"
OUTPUT_FILES: dict[str, str] = {GEOJSON: "application/geo+json", OVERLAY: "image/png", SUMMARY: "application/json"}
