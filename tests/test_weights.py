"""cdc_jax.models.weights: reading converted weight files (.npz)."""

from __future__ import annotations

import numpy as np
import pytest

from cdc_jax.models import weights


class Bad(ValueError):
  pass


def test_listing_shows_at_most_the_limit():
  assert weights.listing(["a", "b"]) == "[a, b]"
  assert weights.listing("abcde", limit=2) == "[a, b, ... (3 more)]"


def test_read_npz_float32_and_plain_archives_only(tmp_path):
  path = tmp_path / "w.npz"
  np.savez(path, **{"a/b": np.arange(3, dtype=np.int64)})
  assert weights.is_npz(str(path))
  assert weights.npz_shapes(str(path), "W", Bad) == {"a/b": (3,)}
  flat = weights.read_npz(str(path), "W", Bad)
  assert list(flat) == ["a/b"] and flat["a/b"].dtype == np.float32
  np.save(tmp_path / "one.npy", np.zeros(2))
  (tmp_path / "text.npz").write_text("not weights")
  np.savez(tmp_path / "obj.npz", a=np.array([{}], dtype=object))
  for name in ("one.npy", "text.npz", "obj.npz"):
    assert not weights.is_npz(str(tmp_path / name)) or name == "obj.npz"
    for read in (weights.npz_shapes, weights.read_npz):
      with pytest.raises(Bad, match=r"^W: not a plain \.npz file .*; hint$"):
        read(str(tmp_path / name), "W", Bad, "hint")


def test_shapes_come_from_the_headers_before_any_array_is_read(
  tmp_path, monkeypatch
):
  path = tmp_path / "w.npz"
  np.savez(path, a=np.zeros((2, 3), np.float32))
  monkeypatch.setattr(np, "load", None)  # reading an array would fail
  assert weights.npz_shapes(str(path), "W", Bad) == {"a": (2, 3)}


def test_mismatches_names_missing_extra_and_reshaped_keys():
  found = {"a": (2,), "b": (3,), "x": (1,)}
  shapes = {"b": (4,), "a": (2,), "c": (1,)}
  assert weights.mismatches(found, shapes) == ["c", "x", "b"]
  assert weights.mismatches({"a": (2,)}, {"a": (2,)}) == []
