"""Tests of aftune.checkpoint: bitwise round trips, partial restore, atomicity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aftune.train import checkpoint as ckpt_lib
from aftune.train.checkpoint import Checkpointer
from aftune.train.checkpoint import CheckpointError

# Orbax's error paths on damaged files leave asyncio tasks behind whose late
# "Event loop is closed" reports pytest would show as warnings.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((16, 8), dtype=np.float32)),
      "bias": jnp.asarray(rng.standard_normal(8, dtype=np.float32)).astype(jnp.bfloat16),
    },
    "layers": [
      jnp.asarray(rng.standard_normal((4, 4), dtype=np.float32)),
      jnp.asarray(rng.standard_normal(4, dtype=np.float32)),
    ],
  }


def _sgd_state(params):
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
  tx = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(sched, momentum=0.9))
  state = tx.init(params)
  # Take a few real steps so the momentum and the counts are not all zero.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  return state


def _adamw_state(params):
  tx = optax.adamw(1e-3)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, -0.25), params)
  _, state = tx.update(grads, state, params)
  return state


def _odd_values() -> dict:
  """Bit patterns that value comparison would not catch (NaN payloads, -0.0)."""
  f32 = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], dtype=np.float32)
  nan_payload = np.array([0x7FC00001, 0xFFC12345], dtype=np.uint32).view(np.float32)
  bf16 = jnp.asarray(np.array([1.0, -0.0, 65504.0, 1e-3], dtype=np.float32)).astype(jnp.bfloat16)
  return {
    "f32": np.concatenate([f32, nan_payload]),
    "bf16": bf16,
    "i32_scalar": jnp.asarray(7, jnp.int32),
    "i32": np.arange(-3, 3, dtype=np.int32),
    "u8": np.arange(5, dtype=np.uint8),
    "f16": np.array([1.5, -2.25], dtype=np.float16),
    "bool": np.array([True, False]),
  }


def _abstract(tree):
  return jax.eval_shape(lambda: tree)


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def state():
  params = _params()
  return {"params": params, "sgd": _sgd_state(params), "adamw": _adamw_state(params)}


def _data_files(step_dir: Path, item: str) -> list[Path]:
  """Orbax's array data files of one item (the OCDBT `d/` chunks), largest first."""
  files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# --------------------------------------------------------------------------- round trips


def test_round_trip_bitwise_optax_states(tmp_path, state):
  items = {
    "block_0": {"params": state["params"], "opt_state": state["sgd"]},
    "block_1": {"params": state["params"], "opt_state": state["adamw"]},
    "odd": _odd_values(),
  }
  with Checkpointer(tmp_path / "ck") as ck:
    ck.save(3, items, {"step": 3, "note": "hi"})
    out = ck.restore(3, {name: _abstract(tree) for name, tree in items.items()})
    assert ck.restore_meta(3) == {"step": 3, "note": "hi"}
  assert list(out) == list(items)
  for name in items:
    _assert_bitwise(out[name], items[name])
  # Optax NamedTuples come back as the same types, usable by optax again.
  sgd = out["block_0"]["opt_state"]
  assert type(sgd) is tuple and isinstance(sgd[0], optax.EmptyState)
  assert isinstance(sgd[1][0], optax.TraceState)
  assert isinstance(sgd[1][1], optax.ScaleByScheduleState)
  assert int(sgd[1][1].count) == 3 and sgd[1][1].count.dtype == jnp.int32
  adam = out["block_1"]["opt_state"]
  assert isinstance(adam[0], optax.ScaleByAdamState) and int(adam[0].count) == 1
  assert jax.tree.structure(adam) == jax.tree.structure(state["adamw"])
  # A fresh Checkpointer (e.g. a verifier process) restores the same, from a
  # concrete example tree too; numpy targets give numpy leaves.
  with Checkpointer(tmp_path / "ck", create=False) as ck2:
    again = ck2.restore(
      3, {"block_1": items["block_1"], "odd": jax.tree.map(np.asarray, items["odd"])}
    )
  _assert_bitwise(again["block_1"], items["block_1"])
  _assert_bitwise(again["odd"], items["odd"])
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(again["odd"]))


def test_partial_restore_reads_only_named_item(tmp_path, state):
  items = {
    f"block_{k}": {"params": _params(k), "opt_state": _adamw_state(_params(k))} for k in range(3)
  }
  with Checkpointer(tmp_path) as ck:
    ck.save(1, items)
    step_dir = tmp_path / "1"
    # Each item is its own Orbax item (directory); empty block_0's array files
    # and delete block_2: restoring block_1 alone must not touch them.
    assert {p.name for p in step_dir.iterdir() if p.is_dir()} >= set(items)
    for f in _data_files(step_dir, "block_0"):
      f.write_bytes(b"")
    shutil.rmtree(step_dir / "block_2")
    out = ck.restore(1, {"block_1": _abstract(items["block_1"])})
    assert list(out) == ["block_1"]
    _assert_bitwise(out["block_1"], items["block_1"])
    with pytest.raises(CheckpointError, match="block_0"):
      ck.restore(1, {"block_0": _abstract(items["block_0"])})


def test_steps_listing_max_to_keep_and_reopen(tmp_path):
  tree = {"x": np.arange(4, dtype=np.float32)}
  with Checkpointer(tmp_path, max_to_keep=2) as ck:
    assert ck.latest_step() is None and ck.all_steps() == []
    for s in (0, 5, 10):
      ck.save(s, {"a": tree}, {"step": s})
    assert ck.all_steps() == [5, 10]
    assert ck.latest_step() == 10
    # A lower step than the latest is saved too (Orbax's default policy would skip it).
    ck.save(7, {"a": tree})
    assert 7 in ck.all_steps()
  with Checkpointer(tmp_path, create=False) as ck:
    assert ck.latest_step() == 10
    assert ck.restore_meta(10) == {"step": 10}


def test_half_written_step_is_never_listed(tmp_path):
  tree = {"x": np.arange(4, dtype=np.float32)}
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {"a": tree})
  # What an interrupted Orbax save leaves: data in `<step>.orbax-checkpoint-tmp`,
  # renamed to `<step>` only after `commit_success.txt` is written.
  tmp = tmp_path / f"2{ckpt_lib.TMP_SUFFIX}"
  (tmp / "a").mkdir(parents=True)
  (tmp / "a" / "_METADATA").write_text("{")
  (tmp_path / f"3{ckpt_lib.TMP_SUFFIX}-1234").mkdir()
  (tmp_path / "4" / "a").mkdir(parents=True)  # a step dir without the commit marker
  (tmp_path / "not_a_step").mkdir()
  assert (tmp_path / "1" / ckpt_lib.COMMIT_MARKER).is_file()
  with Checkpointer(tmp_path) as ck:
    assert ck.all_steps() == [1]
    assert ck.latest_step() == 1
    with pytest.raises(CheckpointError, match=r"step 4: is incomplete.*available steps: \[1\]"):
      ck.restore(4, {"a": _abstract(tree)})
    with pytest.raises(CheckpointError, match="step 4: exists but is incomplete"):
      ck.save(4, {"a": tree})
    # A stale tmp dir of a step is replaced by a fresh save of that step.
    ck.save(2, {"a": tree})
    assert ck.all_steps() == [1, 2]
    _assert_bitwise(ck.restore(2, {"a": _abstract(tree)})["a"], tree)


def test_refuses_to_overwrite(tmp_path):
  tree = {"x": np.arange(4, dtype=np.float32)}
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {"a": tree}, {"v": 1})
    before = {p: p.read_bytes() for p in (tmp_path / "1").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"step 1: exists; refusing to overwrite"):
      ck.save(1, {"a": {"x": np.zeros(4, np.float32)}}, {"v": 2})
  with Checkpointer(tmp_path) as ck:  # also across processes / instances
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
      ck.save(1, {"a": tree})
    assert ck.restore_meta(1) == {"v": 1}
    _assert_bitwise(ck.restore(1, {"a": _abstract(tree)})["a"], tree)
  after = {p: p.read_bytes() for p in (tmp_path / "1").rglob("*") if p.is_file()}
  assert after == before


def test_async_save_then_wait_then_restore(tmp_path, state):
  items = {"block_0": {"params": state["params"], "opt_state": state["adamw"]}}
  host = {"y": np.arange(1000, dtype=np.float32)}
  ck = Checkpointer(tmp_path)
  ck.save(1, {**items, "host": host}, {"step": 1}, wait=False)
  host["y"][:] = -1  # numpy inputs may be reused at once
  ck.save(2, items, {"step": 2}, wait=False)  # waits for step 1 first
  assert ck.latest_step() in (1, 2)
  ck.wait()
  assert ck.all_steps() == [1, 2]
  out = ck.restore(
    1,
    {
      "block_0": _abstract(items["block_0"]),
      "host": {"y": jax.ShapeDtypeStruct((1000,), np.float32)},
    },
  )
  _assert_bitwise(out["block_0"], items["block_0"])
  assert np.array_equal(np.asarray(out["host"]["y"]), np.arange(1000, dtype=np.float32))
  ck.save(3, items, wait=False)
  ck.close()  # close waits
  ck.close()  # idempotent
  assert (tmp_path / "3" / ckpt_lib.COMMIT_MARKER).is_file()
  with pytest.raises(CheckpointError, match="closed"):
    ck.save(4, items)
  with Checkpointer(tmp_path) as ck2:
    _assert_bitwise(
      ck2.restore(3, {"block_0": _abstract(items["block_0"])})["block_0"], items["block_0"]
    )


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def saved(tmp_path):
  # w is over OCDBT's 1 KiB inline limit, so it has a data file of its own.
  tree = {
    "w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64),
    "b": jnp.ones(4, jnp.bfloat16),
    "n": jnp.asarray(3, jnp.int32),
  }
  with Checkpointer(tmp_path / "ck") as ck:
    ck.save(5, {"block_0": tree, "block_1": tree}, {"step": 5})
  return tmp_path / "ck", tree


def test_error_missing_directory(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(CheckpointError, match=r"nope: does not exist"):
    Checkpointer(missing, create=False)
  ck = Checkpointer(tmp_path / "gone")
  (tmp_path / "gone").rmdir()
  with pytest.raises(CheckpointError, match=r"gone: does not exist"):
    ck.restore(0, {"a": {}})
  assert ck.all_steps() == [] and ck.latest_step() is None
  ck.close()
  assert issubclass(CheckpointError, ValueError)


def test_error_missing_step_lists_available(saved):
  d, tree = saved
  with Checkpointer(d) as ck:
    with pytest.raises(
      CheckpointError, match=rf"{d} step 6: does not exist; available steps: \[5\]"
    ):
      ck.restore(6, {"block_0": _abstract(tree)})
    with pytest.raises(CheckpointError, match=r"step 6: does not exist"):
      ck.restore_meta(6)
    with pytest.raises(CheckpointError, match="non-negative int"):
      ck.restore(-1, {"block_0": _abstract(tree)})


def test_error_missing_item(saved):
  d, tree = saved
  with Checkpointer(d) as ck:
    with pytest.raises(
      CheckpointError,
      match=r"step 5: item 'block_9' is not in the checkpoint; available items: "
      r"\[block_0, block_1\]",
    ):
      ck.restore(5, {"block_9": _abstract(tree)})
    with pytest.raises(CheckpointError, match="reserved"):
      ck.restore(5, {"meta": {}})


@pytest.mark.parametrize(
  "change, pattern",
  [
    (
      lambda a: {k: v for k, v in a.items() if k != "n"},
      r"structure mismatch: stored but not in the target: \[n\]",
    ),
    (lambda a: {**a, "z": a["w"]}, r"structure mismatch: in the target but not stored: \[z\]"),
    (lambda a: [a["b"], a["n"], a["w"]], r"structure mismatch"),
    (
      lambda a: {**a, "w": jax.ShapeDtypeStruct((64, 32), jnp.float32)},
      r"w: shape \(64, 32\) != stored \(64, 64\)",
    ),
    (
      lambda a: {**a, "w": jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)},
      r"w: dtype bfloat16 != stored float32",
    ),
    (
      lambda a: {**a, "n": jax.ShapeDtypeStruct((), jnp.float32)},
      r"n: dtype float32 != stored int32",
    ),
    (lambda a: {**a, "n": 3}, r"n: target leaf is a int"),
  ],
)
def test_error_target_mismatch(saved, change, pattern):
  d, tree = saved
  with Checkpointer(d) as ck:
    with pytest.raises(CheckpointError, match=r"step 5: item 'block_0' " + ".*" + pattern):
      ck.restore(5, {"block_0": change(_abstract(tree))})


def test_error_truncated_file(saved):
  d, tree = saved
  f = _data_files(d / "5", "block_0")[0]
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with Checkpointer(d) as ck:
    with pytest.raises(CheckpointError, match=r"step 5: cannot read items \[block_0\]"):
      ck.restore(5, {"block_0": _abstract(tree)})
    # The other item is intact.
    _assert_bitwise(ck.restore(5, {"block_1": _abstract(tree)})["block_1"], tree)


def test_error_truncated_metadata(saved):
  d, tree = saved
  f = d / "5" / "block_0" / "_METADATA"
  f.write_bytes(f.read_bytes()[:20])
  with Checkpointer(d) as ck:
    with pytest.raises(CheckpointError, match=r"step 5: cannot read items \[block_0\]"):
      ck.restore(5, {"block_0": _abstract(tree)})


def test_error_silently_corrupted_data_is_caught(tmp_path):
  # Orbax/TensorStore return flipped bytes of a chunk without complaint; the
  # manifest digests catch it.
  tree = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((64, 64), dtype=np.float32))}
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {"a": tree})
  # The largest file is w's chunk (zstd, without a checksum).
  f = _data_files(tmp_path / "1", "a")[0]
  assert f.stat().st_size > 8192
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0xFF
  f.write_bytes(bytes(b))
  with Checkpointer(tmp_path) as ck:
    with pytest.raises(
      CheckpointError,
      match=r"step 1: item 'a' leaf w does not match the digest "
      r"recorded at save time \(corrupted",
    ):
      ck.restore(1, {"a": _abstract(tree)})


def test_error_corrupted_meta_and_manifest(saved):
  d, tree = saved
  (d / "5" / "meta" / "metadata").write_text('{"step": ')
  with Checkpointer(d) as ck:
    with pytest.raises(CheckpointError, match=r"step 5: 'meta' item is unreadable"):
      ck.restore_meta(5)
  manifest = d / "5" / ckpt_lib.MANIFEST_ITEM / "metadata"
  m = json.loads(manifest.read_text())
  m["format"] = "other"
  manifest.write_text(json.dumps(m))
  with Checkpointer(d) as ck:
    with pytest.raises(CheckpointError, match="manifest"):
      ck.restore(5, {"block_0": _abstract(tree)})


def test_error_bad_save_input(tmp_path):
  with Checkpointer(tmp_path) as ck:
    with pytest.raises(CheckpointError, match="non-empty dict"):
      ck.save(0, {})
    with pytest.raises(CheckpointError, match="reserved"):
      ck.save(0, {"meta": {"x": np.zeros(1)}})
    with pytest.raises(CheckpointError, match="not usable as a directory name"):
      ck.save(0, {"a/b": {"x": np.zeros(1)}})
    with pytest.raises(CheckpointError, match=r"leaf x is a float, not a jax or numpy array"):
      ck.save(0, {"a": {"x": 1.0}})
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
      ck.save(0, {"a": {"x": np.zeros(1)}}, {"bad": object()})
    with pytest.raises(CheckpointError, match="non-negative int"):
      ck.save(True, {"a": {"x": np.zeros(1)}})
    assert ck.all_steps() == []
    assert not any(p.name.startswith("0") for p in tmp_path.iterdir())
