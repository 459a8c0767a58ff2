"""`infergate routes`: the live route table of a running gateway, read from its admin API."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


def table_lines(routes: list[dict[str, Any]]) -> list[str]:
    """One line per target: where it points, file and live weight, what it serves now, notes."""
    rows = [("MODEL", "TARGET", "BACKEND/MODEL:VERSION", "FILE", "WEIGHT", "SERVING", "NOTES")]
    for route in routes:
        rollout = route["rollout"]
        for i, t in enumerate(route["targets"]):
            notes = []
            if route["active"] == t["name"]:
                notes.append("active (blue-green)")
            if rollout and rollout["target"] == t["name"]:
                notes.append(f"rollout {rollout['phase']} at {rollout['percent']}% (steps {rollout['steps']})"
                             + (f": {rollout['reason']}" if rollout["reason"] else ""))
            if any(s["target"] == t["name"] for s in route["shadows"]):
                notes.append("shadow " + ", ".join(f"{s['rate']:.0%}" for s in route["shadows"] if s["target"] == t["name"]))
            if i == 0 and route["overrides"]:
                notes.append(f"runtime overrides: {json.dumps(route['overrides'])}")
            rows.append((route["model"] if i == 0 else "", t["name"], f"{t['backend']}/{t['model']}:{t['version'] or '*'}",
                         str(t["file_weight"]), str(t["weight"]), f"{t['serving']}%", "; ".join(notes)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def print_routes(admin: str, as_json: bool, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{admin.rstrip('/')}/admin/routes", headers=headers),
                                    timeout=5) as answer:
            routes = json.loads(answer.read())
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot read {admin}/admin/routes: {e}", file=sys.stderr)
        return 1
    print(json.dumps(routes, indent=2) if as_json else "\n".join(line.rstrip() for line in table_lines(routes)))
    return 0
