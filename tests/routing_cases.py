"""Broken routing files and the file:line: reason each must be rejected with (used by the unit
test of the loader and by the live-reload integration test)."""

GOOD = """\
models:
  classifier:
    targets:
      v1: {backend: triton, model: classifier, version: 1, weight: 90}
      v2: {backend: triton, model: classifier, version: 2, weight: 10}
"""

BROKEN = {
    "weights not summing": (GOOD.replace("weight: 10", "weight: 20"), 3, "target weights sum to 110, not 100"),
    "unknown backend": (GOOD.replace("version: 2, weight", "version: 2, backend: nope, weight").replace(
        "{backend: triton, model: classifier, version: 2", "{model: classifier, version: 2"), 5, "unknown backend 'nope'"),
    "duplicate names": (GOOD + "      v2: {backend: triton, model: classifier, version: 3, weight: 0}\n", 6, "duplicate key 'v2'"),
    "bad yaml": (GOOD.replace("weight: 10}", "weight: 10"), 6, "YAML syntax"),
    "bad type": (GOOD.replace("weight: 10", "weight: ten"), 5, "Input should be a valid integer"),
    "unknown key": (GOOD.replace("weight: 10", "wieght: 10"), 5, "wieght: unknown key"),
    "pin to unknown target": (GOOD + "    match:\n      - {header: x-canary, value: '1', target: v3}\n", 7, "no target named 'v3'"),
    "active unknown": (GOOD + "    active: green\n", 6, "no target named 'green'"),
    "shadow unknown target": (GOOD + "    shadows:\n      - {target: v9, rate: 0.5}\n", 7, "no target named 'v9'"),
    "rollout steps not increasing": (GOOD + "    rollout: {target: v2, steps: [50, 25]}\n", 6, "steps must be strictly increasing"),
    "target and targets": (GOOD + "    target: {backend: triton, model: classifier}\n", 3, "exactly one of 'target' or 'targets'"),
    "same version twice": (GOOD.replace("version: 2", "version: 1"), 4, "two targets name the same backend, model and version"),
    "sticky with two keys": (GOOD + "    sticky: {header: x-user, parameter: user}\n", 6, "exactly one of 'header' or 'parameter'"),
}
