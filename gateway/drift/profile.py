"""Reference profiles: what a model version's inputs and outputs looked like on known-good data,
as histograms the live counts are compared with. Built offline from sample files
(`infergate drift profile`), saved as JSON (one line per feature or output, so a diff shows which
changed), and checked on load."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

FORMAT = 1
MAX_CODES = 256   # more distinct values than this is a continuous column, not a categorical one


def _frozen(values: object, dtype: type) -> np.ndarray:
    array = np.array(values, dtype)
    array.flags.writeable = False
    return array


def _require(ok: bool, what: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"{what}: {reason}")


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin as the kernels bin: bin = searchsorted(edges, value, "right"), NaN last."""
    bins = np.where(np.isnan(values), len(edges) + 1, np.searchsorted(edges, values, "right"))
    return np.bincount(bins, minlength=len(edges) + 2)


@dataclass(frozen=True, eq=False)
class FeatureProfile:
    """One input column. Numeric: bin i holds edges[i-1] <= x < edges[i] (inner edges from the
    reference quantiles), so reference has len(edges) + 2 bins, the last for NaN. Categorical: edges
    are the codes, one bin each, and the last of len(edges) + 1 bins is "other" (unknown code, NaN)."""

    name: str
    input: str
    column: int
    kind: Literal["numeric", "categorical"]
    edges: np.ndarray
    reference: np.ndarray

    def __post_init__(self) -> None:
        what = f"feature {self.name!r}"
        _require(self.kind in ("numeric", "categorical"), what, f"kind {self.kind!r} is not numeric or categorical")
        _require(isinstance(self.column, int) and self.column >= 0, what, "column must be an integer >= 0")
        object.__setattr__(self, "edges", _frozen(self.edges, np.float64))
        object.__setattr__(self, "reference", _frozen(self.reference, np.int64))
        _require(self.edges.ndim == 1 and bool(np.all(np.isfinite(self.edges)))
                 and bool(np.all(np.diff(self.edges) > 0)), what, "edges must be finite and strictly increasing")
        _require(len(self.edges) <= MAX_CODES or self.kind == "numeric", what, f"more than {MAX_CODES} codes (a continuous column? leave it numeric)")
        bins = len(self.edges) + (2 if self.kind == "numeric" else 1)
        _require(self.reference.shape == (bins,), what, f"reference needs {bins} counts, has {self.reference.shape}")
        _require(bool(np.all(self.reference >= 0)) and self.reference.sum() > 0, what,
                 "reference counts must be >= 0 and not all zero")


@dataclass(frozen=True, eq=False)
class OutputProfile:
    """One output of class probabilities: per class a histogram over bins split at edges (inner
    edges on (0, 1)), and how often each class was the most probable."""

    name: str
    output: str
    classes: int
    edges: np.ndarray
    reference_probs: np.ndarray   # [classes, len(edges) + 1]
    reference_argmax: np.ndarray  # [classes]

    def __post_init__(self) -> None:
        what = f"output {self.name!r}"
        _require(isinstance(self.classes, int) and self.classes >= 1, what, "classes must be an integer >= 1")
        object.__setattr__(self, "edges", _frozen(self.edges, np.float64))
        object.__setattr__(self, "reference_probs", _frozen(self.reference_probs, np.int64))
        object.__setattr__(self, "reference_argmax", _frozen(self.reference_argmax, np.int64))
        _require(self.edges.ndim == 1 and bool(np.all((self.edges > 0) & (self.edges < 1)))
                 and bool(np.all(np.diff(self.edges) > 0)), what, "edges must be strictly increasing inside (0, 1)")
        shape = (self.classes, len(self.edges) + 1)
        _require(self.reference_probs.shape == shape, what, f"reference_probs must be {shape}")
        _require(self.reference_argmax.shape == (self.classes,), what, f"reference_argmax must be ({self.classes},)")
        _require(bool(np.all(self.reference_probs >= 0)) and bool(np.all(self.reference_argmax >= 0))
                 and self.reference_argmax.sum() > 0, what, "reference counts must be >= 0 and not all zero")


@dataclass(frozen=True, eq=False)
class Profile:
    """The reference of one model version; created and trained_at are Unix times."""

    model: str
    version: str
    created: float
    trained_at: float | None
    features: tuple[FeatureProfile, ...]
    outputs: tuple[OutputProfile, ...]

    def __post_init__(self) -> None:
        what = f"profile of {self.model!r} version {self.version!r}"
        _require(bool(self.features or self.outputs), what, "has no features and no outputs")
        names = [f.name for f in self.features]
        _require(len(set(names)) == len(names), what, "feature names repeat")
        _require(len({(f.input, f.column) for f in self.features}) == len(names), what, "an input column repeats")
        _require(len({o.output for o in self.outputs}) == len({o.name for o in self.outputs}) == len(self.outputs),
                 what, "an output or output name repeats")

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON: a line per feature and output, times in ISO 8601."""
        head = {"format": FORMAT, "model": self.model, "version": self.version, "created": _iso(self.created),
                "trained_at": None if self.trained_at is None else _iso(self.trained_at)}
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        for key, items in (("features", self.features), ("outputs", self.outputs)):
            rows = ",\n".join(f"    {json.dumps({k: _plain(v) for k, v in vars(item).items()})}" for item in items)
            lines.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
        Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and check a saved profile; ValueError says what is wrong, with the file name."""
        try:
            doc = json.loads(Path(path).read_text())
            _require(isinstance(doc, dict) and doc.get("format") == FORMAT, "format",
                     f"expected format {FORMAT}, found {doc.get('format') if isinstance(doc, dict) else doc!r}")
            return cls(model=str(doc["model"]), version=str(doc["version"]), created=unix_time(doc["created"]),
                       trained_at=None if doc.get("trained_at") is None else unix_time(doc["trained_at"]),
                       features=tuple(FeatureProfile(**f) for f in doc["features"]),
                       outputs=tuple(OutputProfile(**o) for o in doc["outputs"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid drift profile: {e}") from e


def _plain(value: object) -> object:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def unix_time(text: str) -> float:
    """Unix time of an ISO 8601 text (UTC when it names no zone)."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def build_profile(model: str, version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None,
                  categorical: Mapping[str, Sequence[int]], bins: int = 10, names: Mapping[str, Sequence[str]] | None = None,
                  trained_at: float | None = None) -> Profile:
    """A profile from reference samples: inputs [N, F] (1-D: one feature) binned at their unique
    inner quantiles, or by observed code for the columns `categorical` names; outputs [N, C] class
    probabilities in `bins` equal bins over [0, 1]. Feature names default to input[column]."""
    _require(bins >= 2, "bins", "need at least 2")
    names = names or {}
    for option, given in (("categorical", categorical), ("names", names)):
        _require(set(given) <= set(inputs), option, f"names inputs without a sample: {sorted(set(given) - set(inputs))}")
    quantiles = np.arange(1, bins) / bins   # also the inner edges of the equal probability bins
    features = []
    for input_name, sample in inputs.items():
        data = np.asarray(sample, np.float64)
        data = data[:, None] if data.ndim == 1 else data
        _require(data.ndim == 2 and len(data) > 0, f"input {input_name!r}", "sample must be [N, F] with N > 0")
        labels = list(names.get(input_name) or (f"{input_name}[{c}]" for c in range(data.shape[1])))
        _require(len(labels) == data.shape[1], f"input {input_name!r}", f"{len(labels)} names for {data.shape[1]} columns")
        codes_at = set(categorical.get(input_name, ()))
        _require(codes_at <= set(range(data.shape[1])), f"input {input_name!r}", f"categorical columns {sorted(codes_at)} out of range")
        for column, label in enumerate(labels):
            values = data[:, column]
            if column in codes_at:
                codes = np.unique(values[~np.isnan(values)])   # bin k + 1 of _histogram holds code k
                reference = np.append(_histogram(values, codes)[1:-1], np.isnan(values).sum())
                features.append(FeatureProfile(label, input_name, column, "categorical", codes, reference))
            else:
                finite = values[np.isfinite(values)]
                edges = np.unique(np.quantile(finite, quantiles)) if len(finite) else np.empty(0)
                features.append(FeatureProfile(label, input_name, column, "numeric", edges, _histogram(values, edges)))
    profiles = []
    for output, sample in (outputs or {}).items():
        probs = np.asarray(sample, np.float64)
        _require(probs.ndim == 2 and len(probs) > 0, f"output {output!r}", "sample must be [N, C] with N > 0")
        _require(bool(np.all((probs >= 0) & (probs <= 1))), f"output {output!r}",
                 "needs class probabilities in [0, 1] (apply softmax to logits)")
        per_class = [_histogram(probs[:, c], quantiles)[:-1] for c in range(probs.shape[1])]
        argmax = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        profiles.append(OutputProfile(output, output, probs.shape[1], quantiles, per_class, argmax))
    return Profile(model, version, time.time(), trained_at, tuple(features), tuple(profiles))


def read_sample(path: str | Path) -> np.ndarray:
    """A reference sample: .npy as stored, .csv numeric (a first line that is not numbers is a
    header), .parquet every numeric column as [N, F] float64 (nulls as NaN)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        sample = np.load(path, allow_pickle=False)
        _require(np.issubdtype(sample.dtype, np.number) or sample.dtype == bool, str(path), f"holds {sample.dtype}, not numbers")
        return sample
    if suffix == ".csv":
        with path.open() as f:
            first = f.readline()
        try:
            [float(cell) for cell in first.split(",")]
            header = 0
        except ValueError:
            header = 1
        return np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        numeric = [c for c, t in zip(table.column_names, table.schema.types)
                   if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)]
        _require(bool(numeric), str(path), "has no numeric columns")
        return np.column_stack([table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False) for c in numeric])
    raise ValueError(f"{path}: unknown sample format {suffix!r} (use .npy, .csv or .parquet)")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `infergate drift profile`."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--input", dest="inputs", action="append", required=True, metavar="NAME=FILE",
                        help="reference sample of one input tensor (.npy, .csv, .parquet): [N, F], 1-D is one feature")
    parser.add_argument("--output", dest="outputs", action="append", default=[], metavar="NAME=FILE",
                        help="class probabilities [N, C] the model gave for the reference rows")
    parser.add_argument("--categorical", action="append", default=[], metavar="NAME=COL,COL",
                        help="columns of input NAME that hold category codes")
    parser.add_argument("--bins", type=int, default=10, help="quantile bins per numeric feature, equal bins per class")
    parser.add_argument("--names", action="append", default=[], metavar="NAME=A,B,C",
                        help="feature names for the columns of input NAME (default NAME[column])")
    parser.add_argument("--trained-at", metavar="ISO8601", help="when this version was trained (for staleness alerts)")
    parser.add_argument("--out", required=True, help="where to write the profile JSON")


def _pairs(items: list[str], option: str) -> dict[str, str]:
    split = [item.partition("=") for item in items]
    _require(all(k and eq and v for k, eq, v in split), option, "expects NAME=VALUE")
    return {k: v for k, _, v in split}


def profile_command(args: argparse.Namespace) -> int:
    """Build a profile from the sample files named in args and save it; 1 with a message on error."""
    try:
        profile = build_profile(
            args.model, args.version,
            {k: read_sample(v) for k, v in _pairs(args.inputs, "--input").items()},
            {k: read_sample(v) for k, v in _pairs(args.outputs, "--output").items()},
            {k: [int(c) for c in v.split(",")] for k, v in _pairs(args.categorical, "--categorical").items()},
            bins=args.bins, names={k: v.split(",") for k, v in _pairs(args.names, "--names").items()},
            trained_at=None if args.trained_at is None else unix_time(args.trained_at))
        profile.save(args.out)
    except (OSError, ValueError) as e:
        print(f"infergate drift profile: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(profile.features)} features, {len(profile.outputs)} outputs")
    return 0
