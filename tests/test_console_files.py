"""The console's files are served from the package, every module it imports is there, nothing points
outside the server; and the two small read endpoints it uses (recipes, a model's loss history)."""

from __future__ import annotations

import re

IMPORT = re.compile(r"""^\s*(?:import|export)\s[^;]*?from\s+["'](\.{1,2}/[^"']+)["']""", re.MULTILINE)
EXTERNAL = re.compile(r"""(?:src|href|url\()\s*=?\s*["']?(?:https?:)?//""")


def test_console_page_and_every_module_it_imports_are_served(client):
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert not EXTERNAL.search(page.text)
    assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui"

    stylesheet = client.get("/ui/static/console.css")
    assert stylesheet.status_code == 200 and not EXTERNAL.search(stylesheet.text)
    assert "/ui/fonts/cjk.otf" in stylesheet.text
    font = client.get("/ui/fonts/cjk.otf")
    assert font.status_code == 200 and font.headers["content-type"] == "font/otf" and font.content[:4] == b"OTTO"

    seen, pending = set(), ["/ui/static/js/main.js"]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        module = client.get(path)
        assert module.status_code == 200, path
        assert "javascript" in module.headers["content-type"], path
        assert not re.search(r"""from\s+["']https?:""", module.text), path
        base = path.rsplit("/", 1)[0]
        for relative in IMPORT.findall(module.text):
            parts = f"{base}/{relative}".split("/")
            resolved = []
            for part in parts:
                if part == "..":
                    resolved.pop()
                elif part != ".":
                    resolved.append(part)
            pending.append("/".join(resolved))
    assert {"/ui/static/js/api.js", "/ui/static/js/charts.js", "/ui/static/js/pages/reports.js"} <= seen


def test_console_routes_are_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(path.startswith("/ui") or path == "/metrics" for path in paths)
    assert "/configs" in paths and "/models/{model_id}/loss_history" in paths


def test_recipes_list_names_the_default(client):
    recipes = {r["name"]: r for r in client.get("/configs").json()}
    assert {"tiny_test", "cpu_small", "cmcc34_qlora_system_prompt"} <= set(recipes)
    assert [name for name, r in recipes.items() if r["default"]] == ["tiny_test"]  # DEFAULT_CONFIG of the fixture
    assert recipes["tiny_test"]["base_model"] == "tiny-glm4"
    assert recipes["tiny_test"]["hyperparameters"]["max_steps"] == 20

