"""Checkpoints of named PyTree items, one Orbax item each, bitwise and verified.

This is the only module of aftune that talks to Orbax. A checkpoint step is a
directory ``<directory>/<step>`` written by ``orbax.checkpoint.CheckpointManager``
holding one Orbax item per caller item (e.g. ``block_0``, ``block_1``, ...) plus
two small JSON items of our own:

* ``meta``: the caller's JSON metadata (``{}`` when none was given);
* ``_manifest``: for every item and every array leaf, its path, dtype, shape and
  canonical tensor digest (`hashing.hash_array`; in a run of several processes each hashes its own shards), written in the same atomic step.

Because each item is its own Orbax item, ``restore`` reads only the items asked
for: a verifier can load one layer block's parameters and optimizer state
without reading the other blocks. Every restored leaf is checked against the
manifest (dtype, shape and digest), so a corrupted file is reported even where
Orbax/TensorStore would silently return wrong bytes (the data chunks carry no
checksum of their own). Leaves come back in the target's structure: a target of
``jax.ShapeDtypeStruct`` leaves gives ``jax.Array`` leaves, a concrete target
gives leaves of the same kind (numpy stays numpy).

A step counts as saved only once Orbax committed it: Orbax writes into
``<step>.orbax-checkpoint-tmp``, writes ``commit_success.txt`` and renames, and
``all_steps``/``latest_step`` list only directories holding that marker. Steps are
never overwritten.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from aftune import errors
from aftune.train import multihost

PyTree = Any

META_ITEM = "meta"
MANIFEST_ITEM = "_manifest"
RESERVED_ITEMS = frozenset({META_ITEM, MANIFEST_ITEM})
MANIFEST_FORMAT = "aftune-checkpoint/v2"  # v2: leaf digests are hashing.hash_array

# Orbax's marker of a committed step (orbax.checkpoint._src.path.atomicity_types).
COMMIT_MARKER = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"

_STEP_NAME = re.compile(r"0|[1-9][0-9]*")
_MAX_LISTED = 8


class CheckpointError(errors.InputError):
  """A checkpoint cannot be written or read as asked (says where and why)."""


class _QuietOrbax(logging.Filter):
  """Orbax logs a dozen INFO lines per save through absl; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


logging.getLogger("absl").addFilter(_QuietOrbax())


# --------------------------------------------------------------------------- helpers


def _key_name(key: Any) -> str:
  """One path component, container-agnostic like Orbax (NamedTuple field == dict key)."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _flatten(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _fmt_path(path: tuple[str, ...] | list[str]) -> str:
  return "/".join(path) if path else "<root>"


def _listing(names: Any) -> str:
  names = list(names)
  shown = ", ".join(str(n) for n in names[:_MAX_LISTED])
  more = f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
  return f"[{shown}{more}]"


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray))


def _check_item_names(names: Any, where: str, *, allow_reserved: bool = False) -> None:
  for name in names:
    if not isinstance(name, str) or not name:
      raise CheckpointError(f"{where}: item names must be non-empty strings, got {name!r}")
    if name in (".", "..") or any(c in name for c in "/\\\0") or name.endswith(TMP_SUFFIX):
      raise CheckpointError(f"{where}: item name {name!r} is not usable as a directory name")
    if not allow_reserved and name in RESERVED_ITEMS:
      raise CheckpointError(
        f"{where}: item name {name!r} is reserved (reserved: {sorted(RESERVED_ITEMS)}); "
        "pass metadata through `meta=`"
      )


def _check_step(step: Any, where: str) -> int:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise CheckpointError(f"{where}: step must be a non-negative int, got {step!r}")
  return int(step)


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Saves and restores steps of named PyTree items under one directory.

  Usage::

      with Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
        ckpt.save(step, {"block_0": {"params": p0, "opt_state": o0}, ...}, {"step": step})
        items = ckpt.restore(step, {"block_0": abstract_block_0})   # reads block_0 only
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, create: bool = True):
    self._dir = Path(directory).expanduser().absolute()
    if max_to_keep is not None and (
      isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
      raise CheckpointError(
        f"checkpoint directory {self._dir}: max_to_keep must be a positive int "
        f"or None, got {max_to_keep!r}"
      )
    if self._dir.exists() and not self._dir.is_dir():
      raise CheckpointError(f"checkpoint directory {self._dir}: exists and is not a directory")
    if not create and not self._dir.is_dir():
      raise CheckpointError(f"checkpoint directory {self._dir}: does not exist (create=False)")
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=create,
      enable_async_checkpointing=True,
      # Never delete other writers' in-flight tmp dirs (a verifier may open the
      # directory while the trainer writes); Orbax replaces a stale tmp dir of
      # a step when that step is saved again.
      cleanup_tmp_directories=False,
    )
    try:
      self._mngr = ocp.CheckpointManager(self._dir, options=options)
    except Exception as e:  # noqa: BLE001 - one clear error type for callers
      raise CheckpointError(f"checkpoint directory {self._dir}: cannot open: {e}") from e
    self._closed = False

  # ------------------------------------------------------------------ context manager

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"Checkpointer({str(self._dir)!r})"

  @property
  def directory(self) -> Path:
    return self._dir

  # ------------------------------------------------------------------ steps

  def _where(self, step: int | None = None) -> str:
    return f"checkpoint {self._dir}" + ("" if step is None else f" step {step}")

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (in-flight and half-written steps are not listed)."""
    if not self._dir.is_dir():
      return []
    steps = []
    for p in self._dir.iterdir():
      if _STEP_NAME.fullmatch(p.name) and p.is_dir() and (p / COMMIT_MARKER).is_file():
        steps.append(int(p.name))
    return sorted(steps)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _check_open(self, where: str) -> None:
    if self._closed:
      raise CheckpointError(f"{where}: this Checkpointer is closed")

  def _check_restorable(self, step: Any) -> int:
    step = _check_step(step, self._where())
    where = self._where(step)
    self._check_open(where)
    if not self._dir.is_dir():
      raise CheckpointError(f"checkpoint directory {self._dir}: does not exist")
    self.wait()  # a step saved with wait=False becomes readable here
    steps = self.all_steps()
    if step not in steps:
      if (self._dir / str(step)).exists():
        problem = "is incomplete (no Orbax commit marker; an interrupted or foreign write)"
      else:
        problem = "does not exist"
      raise CheckpointError(f"{where}: {problem}; available steps: {_listing(steps)}")
    return step

  # ------------------------------------------------------------------ save

  def save(
    self,
    step: int,
    items: Mapping[str, PyTree],
    meta: Mapping[str, Any] | None = None,
    *,
    wait: bool = True,
  ) -> None:
    """Saves `items` (one Orbax item each) and JSON `meta` as `step`.

    With ``wait=False`` this returns once the arrays are copied for writing and
    the write goes on in the background; ``wait()``, ``restore``, the next
    ``save`` and ``close()`` wait for it (numpy leaves are copied first, so the
    caller may reuse them). The digests of the manifest are computed before
    returning. Raises CheckpointError if the step exists (nothing is
    overwritten) or the input is not savable.
    """
    step = _check_step(step, self._where())
    where = self._where(step)
    self._check_open(where)
    if not isinstance(items, Mapping) or not items:
      raise CheckpointError(f"{where}: items must be a non-empty dict of name -> PyTree")
    _check_item_names(items.keys(), where)
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
      raise CheckpointError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    try:
      meta = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{where}: meta is not JSON-serializable: {e}") from e

    self.wait()  # Orbax would wait for the previous save anyway; its step must be visible
    if (self._dir / str(step)).exists() or step in self._mngr.all_steps():
      state = "exists" if step in self.all_steps() else "exists but is incomplete (not committed)"
      raise CheckpointError(
        f"{where}: {state}; refusing to overwrite it "
        f"(committed steps: {_listing(self.all_steps())})"
      )

    manifest_items = {}
    to_save = {}
    for name, tree in items.items():
      flat = _flatten(tree)
      for path, leaf in flat:
        if not _is_array(leaf):
          raise CheckpointError(
            f"{where}: item {name!r} leaf {_fmt_path(path)} is a {type(leaf).__name__}, "
            "not a jax or numpy array (wrap scalars with np.asarray(x, dtype))"
          )
      try:
        # The canonical tensor hash, each process hashing the shards it holds.
        digests = multihost.global_digests([("tensor", leaf) for _, leaf in flat])
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: item {name!r} cannot be hashed: {e}") from e
      manifest_items[name] = {"leaves": [
          {"path": list(path), "dtype": str(np.dtype(leaf.dtype)), "shape": list(np.shape(leaf)),
           "digest": d.hex()} for (path, leaf), d in zip(flat, digests)]}
      if not wait:
        # Orbax may read numpy buffers after save() returns; snapshot them now.
        tree = jax.tree.map(
          lambda x: np.array(x, copy=True) if isinstance(x, np.ndarray) else x, tree
        )
      to_save[name] = tree
    manifest = {"format": MANIFEST_FORMAT, "step": step, "items": manifest_items}

    args = {name: ocp.args.StandardSave(tree) for name, tree in to_save.items()}
    args[META_ITEM] = ocp.args.JsonSave(meta)
    args[MANIFEST_ITEM] = ocp.args.JsonSave(manifest)
    try:
      # force=True: Orbax's default save policy silently skips (returns False)
      # a step not after the latest one; we want every asked-for save or an error.
      saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{where}: save failed: {type(e).__name__}: {e}") from e
    if not saved:
      raise CheckpointError(f"{where}: Orbax declined to save this step")
    if wait:
      self.wait()

  def wait(self) -> None:
    """Blocks until background saves are committed (raises if one failed)."""
    if self._closed:
      return
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
        f"{self._where()}: a background save failed: {type(e).__name__}: {e}"
      ) from e

  def close(self) -> None:
    """Waits for background saves, then releases Orbax's threads. Idempotent."""
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      try:
        self._mngr.close()
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{self._where()}: close failed: {type(e).__name__}: {e}") from e

  # ------------------------------------------------------------------ restore

  def _restore_json(self, step: int, item: str) -> Any:
    where = self._where(step)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
      return out[item]
    except Exception as e:  # noqa: BLE001
      if not (self._dir / str(step) / item).exists():
        raise CheckpointError(
          f"{where}: has no {item!r} item (not written by aftune's Checkpointer, or damaged)"
        ) from e
      raise CheckpointError(
        f"{where}: {item!r} item is unreadable (corrupted?): {type(e).__name__}: {e}"
      ) from e

  def restore_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`."""
    step = self._check_restorable(step)
    meta = self._restore_json(step, META_ITEM)
    if not isinstance(meta, dict):
      raise CheckpointError(f"{self._where(step)}: meta item is not a JSON object")
    return meta

  def _manifest(self, step: int) -> dict:
    manifest = self._restore_json(step, MANIFEST_ITEM)
    if (
      not isinstance(manifest, dict)
      or manifest.get("format") != MANIFEST_FORMAT
      or not isinstance(manifest.get("items"), dict)
    ):
      raise CheckpointError(f"{self._where(step)}: manifest is not an {MANIFEST_FORMAT} manifest")
    return manifest

  def restore(self, step: int, abstract_items: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """Restores only the named items of `step`, each into its target's structure.

    `abstract_items` maps item name -> target tree whose leaves are
    ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) or example arrays.
    Paths, dtypes and shapes must equal the stored ones exactly (no casting),
    and every restored leaf must match the digest recorded at save time.
    """
    step = self._check_restorable(step)
    where = self._where(step)
    if not isinstance(abstract_items, Mapping) or not abstract_items:
      raise CheckpointError(f"{where}: abstract_items must be a non-empty dict of name -> PyTree")
    _check_item_names(abstract_items.keys(), where)
    stored = self._manifest(step)["items"]

    for name, target in abstract_items.items():
      if name not in stored:
        raise CheckpointError(
          f"{where}: item {name!r} is not in the checkpoint; "
          f"available items: {_listing(sorted(stored))}"
        )
      self._check_target(where, name, target, stored[name]["leaves"])

    args = {name: ocp.args.StandardRestore(target) for name, target in abstract_items.items()}
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
        f"{where}: cannot read items {_listing(abstract_items)} "
        f"(truncated or corrupted files?): {type(e).__name__}: "
        f"{str(e)[:2000]}"
      ) from e

    out = {}
    for name, target in abstract_items.items():
      tree = restored[name]
      if jax.tree.structure(tree) != jax.tree.structure(target):
        raise CheckpointError(
          f"{where}: item {name!r} came back with structure "
          f"{jax.tree.structure(tree)}, expected {jax.tree.structure(target)}"
        )
      flat = _flatten(tree)
      digests = multihost.global_digests([("tensor", leaf) for _, leaf in flat])
      for (path, leaf), entry, d in zip(flat, stored[name]["leaves"], digests):
        if (
          str(np.dtype(leaf.dtype)) != entry["dtype"]
          or list(np.shape(leaf)) != entry["shape"]
          or d.hex() != entry["digest"]
        ):
          raise CheckpointError(
            f"{where}: item {name!r} leaf {_fmt_path(path)} does not match "
            "the digest recorded at save time (corrupted checkpoint file)"
          )
      out[name] = tree
    return out

  @staticmethod
  def _check_target(where: str, name: str, target: PyTree, leaves: list[dict]) -> None:
    flat = _flatten(target)
    want = {tuple(e["path"]): e for e in leaves}
    have = [path for path, _ in flat]
    missing = [p for p in want if p not in set(have)]
    extra = [p for p in have if p not in want]
    order_ok = have == [tuple(e["path"]) for e in leaves]
    if missing or extra or not order_ok:
      parts = []
      if missing:
        parts.append(f"stored but not in the target: {_listing(map(_fmt_path, missing))}")
      if extra:
        parts.append(f"in the target but not stored: {_listing(map(_fmt_path, extra))}")
      if not parts:
        parts.append("leaf order differs")
      raise CheckpointError(f"{where}: item {name!r} structure mismatch: " + "; ".join(parts))
    problems = []
    for path, leaf in flat:
      entry = want[path]
      dtype, shape = getattr(leaf, "dtype", None), getattr(leaf, "shape", None)
      if dtype is None or shape is None:
        problems.append(
          f"{_fmt_path(path)}: target leaf is a {type(leaf).__name__}, "
          "not an array or jax.ShapeDtypeStruct"
        )
        continue
      if str(np.dtype(dtype)) != entry["dtype"]:
        problems.append(f"{_fmt_path(path)}: dtype {np.dtype(dtype)} != stored {entry['dtype']}")
      if list(shape) != entry["shape"]:
        problems.append(
          f"{_fmt_path(path)}: shape {tuple(shape)} != stored {tuple(entry['shape'])}"
        )
    if problems:
      raise CheckpointError(
        f"{where}: item {name!r} does not match the target: "
        + "; ".join(problems[:_MAX_LISTED])
        + (f"; ... ({len(problems)} in all)" if len(problems) > _MAX_LISTED else "")
      )
