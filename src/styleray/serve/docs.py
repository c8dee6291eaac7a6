"""``/docs``: the API reference as one self-contained HTML page, built from the app's OpenAPI schema.

FastAPI's default ``/docs`` loads Swagger UI's script and styles from a CDN, which fails offline and lets a
third party run script on the API's origin; no installed package ships those assets. This page needs no
script at all: every route with its summary, parameters (type, bounds, default, description), JSON body
and response types, rendered on the server. The machine-readable schema stays at ``/openapi.json``.
"""

from __future__ import annotations

import html
import json
from typing import Any

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 980px; padding: 16px 20px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin: 28px 0 6px; border-top: 1px solid #ddd; padding-top: 14px; }
code, .path { font-family: ui-monospace, monospace; } .method { font-weight: bold; color: #3b5bdb; margin-right: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; } th, td { text-align: left; padding: 4px 8px;
border-bottom: 1px solid #eee; vertical-align: top; } .muted { color: #667; }
"""


def render_docs(schema: dict[str, Any]) -> str:
    """The reference page for an OpenAPI schema (every text HTML-escaped)."""
    info = schema.get("info", {})
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(info.get('title', 'API'))} API</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_e(info.get('title', 'API'))} API <span class='muted'>v{_e(info.get('version', ''))}</span></h1>",
        f"<p>{_e(info.get('description', ''))}</p>",
        "<p class='muted'>The schema as JSON: <a href='openapi.json'>openapi.json</a>.</p>",
    ]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(_operation(path, method, op, schema))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, op: dict, schema: dict) -> str:
    out = [f"<h2><span class='method'>{_e(method.upper())}</span><span class='path'>{_e(path)}</span></h2>"]
    out.append(f"<p>{_e(op.get('summary', ''))}</p>")
    params = op.get("parameters", [])
    if params:
        out.append("<table><tr><th>parameter</th><th>in</th><th>type and bounds</th><th>description</th></tr>")
        for p in params:
            required = " <b>(required)</b>" if p.get("required") else ""
            out.append(
                f"<tr><td><code>{_e(p.get('name', ''))}</code>{required}</td><td>{_e(p.get('in', ''))}</td>"
                f"<td>{_e(_type(p.get('schema', {})))}</td><td>{_e(p.get('description', ''))}</td></tr>"
            )
        out.append("</table>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        out.append(_body(_deref(body, schema), schema))
    types = sorted({t for r in op.get("responses", {}).values() for t in r.get("content", {})})
    if types:
        out.append(f"<p class='muted'>responds with: {_e(', '.join(types))}</p>")
    return "\n".join(out)


def _body(model: dict, schema: dict) -> str:
    rows = []
    for name, prop in model.get("properties", {}).items():
        required = " <b>(required)</b>" if name in model.get("required", []) else ""
        rows.append(
            f"<tr><td><code>{_e(name)}</code>{required}</td><td>{_e(_type(_deref(prop, schema)))}</td>"
            f"<td>{_e(prop.get('description', ''))}</td></tr>"
        )
    return (
        "<p>JSON body:</p><table><tr><th>field</th><th>type and bounds</th><th>description</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _deref(node: dict, schema: dict) -> dict:
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema
    for key in ref.lstrip("#/").split("/"):
        target = target.get(key, {})
    return target


def _type(s: dict) -> str:
    """'integer in [0, 4294967295], default 1' from a JSON schema."""
    if "anyOf" in s:
        kinds = " or ".join(_type(x) for x in s["anyOf"])
    elif "enum" in s:
        kinds = "one of " + ", ".join(json.dumps(v) for v in s["enum"])
    elif s.get("type") == "array":
        kinds = f"list of {_type(s.get('items', {}))}"
    else:
        kinds = s.get("type", "any")
    bounds = [f"{word} {s[key]}" for key, word in
              (("minimum", ">="), ("maximum", "<="), ("maxLength", "length <="), ("maxItems", "items <="))
              if key in s]
    default = f", default {json.dumps(s['default'])}" if "default" in s else ""
    return kinds + (f" ({', '.join(bounds)})" if bounds else "") + default


def _e(text: Any) -> str:
    return html.escape(str(text))
