"""Reference profiles: building from samples, the JSON round trip, checks on load, sample formats, the command."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.drift.profile import Profile, add_profile_arguments, build_profile, profile_command, read_sample
from gateway.drift.state import Binner

RNG = np.random.default_rng(3)


def sample_profile(bins: int = 10) -> tuple[Profile, np.ndarray, np.ndarray]:
    x = RNG.standard_normal((2000, 3))
    x[:, 1] = RNG.choice([2.0, 5.0, 9.0], 2000)
    x[:7, 0] = np.nan
    x[7:600, 2] = 0.0    # ties: quantiles repeat
    probs = RNG.dirichlet(np.ones(3), 2000)
    return build_profile("m", "2", {"x": x, "age": x[:, 0] * 10}, {"probs": probs}, {"x": [1]}, bins=bins,
                         names={"x": ["a", "b", "c"]}, trained_at=1.7e9), x, probs


def test_build_bins_at_unique_quantiles_and_observed_codes():
    profile, x, probs = sample_profile()
    a, b, c, age = profile.features
    assert [f.name for f in profile.features] == ["a", "b", "c", "age[0]"]
    assert (a.kind, b.kind, c.kind, age.input, age.column) == ("numeric", "categorical", "numeric", "age", 0)
    finite = x[~np.isnan(x[:, 0]), 0]
    np.testing.assert_array_equal(a.edges, np.quantile(finite, np.arange(1, 10) / 10))
    np.testing.assert_array_equal(a.reference[:-1], np.bincount(np.searchsorted(a.edges, finite, "right"), minlength=10))
    assert a.reference[-1] == 7 and set(a.reference[:-1]) == {199, 200}   # NaN last; deciles of 1993 values
    np.testing.assert_array_equal(b.edges, [2.0, 5.0, 9.0])
    np.testing.assert_array_equal(b.reference, [(x[:, 1] == v).sum() for v in (2.0, 5.0, 9.0)] + [0])
    assert len(c.edges) < 9 and np.all(np.diff(c.edges) > 0)   # tied quantiles collapsed
    out, = profile.outputs
    assert (out.name, out.output, out.classes) == ("probs", "probs", 3)
    np.testing.assert_allclose(out.edges, np.linspace(0, 1, 11)[1:-1])
    for k in range(3):
        np.testing.assert_array_equal(out.reference_probs[k], np.histogram(probs[:, k], np.linspace(0, 1, 11))[0])
    np.testing.assert_array_equal(out.reference_argmax, np.bincount(probs.argmax(1), minlength=3))
    assert profile.trained_at == 1.7e9


def test_the_reference_is_what_the_kernels_count_on_the_same_sample():
    profile, x, probs = sample_profile()
    binner = Binner(profile)
    counts = binner.zeros()
    binner.observe(counts, {"x": x, "age": x[:, :1] * 10}, {"probs": probs})
    rows = {name: i for i, name in enumerate(binner.layout.features)}
    for f in profile.features:
        row = counts.features[rows[f.name]]
        np.testing.assert_array_equal(np.append(row[:len(f.reference) - 1], row[-1]), f.reference)
    np.testing.assert_array_equal(counts.probs[:, :10], profile.outputs[0].reference_probs)
    np.testing.assert_array_equal(counts.argmax, profile.outputs[0].reference_argmax)


def test_save_and_load_round_trip(tmp_path):
    profile, _, _ = sample_profile()
    path = tmp_path / "p.json"
    profile.save(path)
    text = path.read_text()
    doc = json.loads(text)
    assert doc["format"] == 1 and doc["created"].endswith("+00:00") and doc["trained_at"] == "2023-11-14T22:13:20+00:00"
    assert len(text.splitlines()) == 1 + 5 + (1 + 4 + 1) + (1 + 1 + 1) + 1   # { head features outputs }: a line each
    loaded = Profile.load(path)
    assert (loaded.model, loaded.version, loaded.trained_at) == ("m", "2", 1.7e9)
    assert loaded.created == pytest.approx(profile.created, abs=1e-6)
    for mine, theirs in zip(profile.features + profile.outputs, loaded.features + loaded.outputs):
        for key, value in vars(mine).items():
            np.testing.assert_array_equal(getattr(theirs, key), value)


@pytest.mark.parametrize("change, reason", [
    (lambda d: d.update(format=2), "expected format 1"),
    (lambda d: d["features"][0].update(edges=[1.0, 0.0]), "strictly increasing"),
    (lambda d: d["features"][0].update(reference=[1, 2]), "reference needs 11 counts"),
    (lambda d: d["features"][0].update(kind="ordinal"), "is not numeric or categorical"),
    (lambda d: d["features"][1].update(name="a"), "feature names repeat"),
    (lambda d: d["outputs"][0].update(edges=[0.5, 1.5]), "inside \\(0, 1\\)"),
    (lambda d: d["outputs"][0].update(reference_argmax=[0, 0, 0]), "not all zero"),
    (lambda d: d.pop("model"), "'model'"),
    (lambda d: d["features"][0].update(colour=1), "colour"),
])
def test_load_says_what_is_wrong(tmp_path, change, reason):
    profile, _, _ = sample_profile()
    path = tmp_path / "p.json"
    profile.save(path)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"p.json: not a valid drift profile: .*{reason}"):
        Profile.load(path)


def test_build_refuses_what_it_cannot_profile():
    x = RNG.standard_normal((10, 2))
    with pytest.raises(ValueError, match="class probabilities in \\[0, 1\\]"):
        build_profile("m", "1", {"x": x}, {"logits": x}, {})
    with pytest.raises(ValueError, match="1 names for 2 columns"):
        build_profile("m", "1", {"x": x}, None, {}, names={"x": ["a"]})
    with pytest.raises(ValueError, match="categorical columns \\[2\\] out of range"):
        build_profile("m", "1", {"x": x}, None, {"x": [2]})
    with pytest.raises(ValueError, match="more than 256 codes"):
        build_profile("m", "1", {"x": RNG.standard_normal((500, 1))}, None, {"x": [0]})
    with pytest.raises(ValueError, match="without a sample"):
        build_profile("m", "1", {"x": x}, None, {"y": [0]})


def test_read_sample_formats(tmp_path):
    data = RNG.standard_normal((20, 3))
    np.save(tmp_path / "s.npy", data)
    np.savetxt(tmp_path / "plain.csv", data, delimiter=",")
    np.savetxt(tmp_path / "header.csv", data, delimiter=",", header="a,b,c", comments="")
    table = pa.table({"a": data[:, 0], "label": ["x"] * 20, "b": pa.array([1, None] * 10, pa.int64()), "c": data[:, 2]})
    pq.write_table(table, tmp_path / "s.parquet")
    np.testing.assert_array_equal(read_sample(tmp_path / "s.npy"), data)
    np.testing.assert_array_equal(read_sample(tmp_path / "plain.csv"), data)
    np.testing.assert_array_equal(read_sample(tmp_path / "header.csv"), data)
    got = read_sample(tmp_path / "s.parquet")
    assert got.shape == (20, 3) and got.dtype == np.float64
    np.testing.assert_array_equal(got[:, [0, 2]], data[:, [0, 2]])
    np.testing.assert_array_equal(got[:4, 1], [1.0, np.nan, 1.0, np.nan])
    with pytest.raises(ValueError, match="unknown sample format '.txt'"):
        read_sample(tmp_path / "s.txt")
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="words.npy: holds <U1, not numbers"):
        read_sample(tmp_path / "words.npy")


def test_profile_command(tmp_path, capsys):
    x = RNG.standard_normal((300, 3))
    x[:, 2] = RNG.integers(0, 4, 300)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "p.csv", RNG.dirichlet(np.ones(2), 300), delimiter=",")
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    out = tmp_path / "profile.json"
    args = parser.parse_args(["--model", "m", "--version", "3", "--input", f"x={tmp_path / 'x.npy'}",
                              "--output", f"probs={tmp_path / 'p.csv'}", "--categorical", "x=2", "--bins", "5",
                              "--names", "x=a,b,c", "--trained-at", "2024-05-01T12:00:00Z", "--out", str(out)])
    assert profile_command(args) == 0 and capsys.readouterr().out == f"{out}: 3 features, 1 outputs\n"
    profile = Profile.load(out)
    assert [f.name for f in profile.features] == ["a", "b", "c"] and len(profile.features[0].edges) == 4
    assert profile.features[2].kind == "categorical" and list(profile.features[2].edges) == [0, 1, 2, 3]
    assert profile.trained_at == 1714564800.0 and profile.outputs[0].classes == 2
    args.inputs = ["x"]
    assert profile_command(args) == 1 and "--input: expects NAME=VALUE" in capsys.readouterr().err
