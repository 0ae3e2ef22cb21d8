"""Shared pytest setup and fixtures.

The repo root goes on sys.path, slow tests are skipped unless --runslow, and the fixtures
shared by several test files live here (test files never import each other):

  small_config   factory of the smoke fine-tune run sheet: small_config(**{"dotted.key": value})
  ref_h          the reference BLAKE3 tagged hash written from docs/hashing.md
  hashing_doc    docs/hashing.md without whitespace, to look the printed test vectors up in

The tiny Hugging Face checkpoint writers are the plugin tests/hf_fixtures.py (fixtures
`tiny_hf` and `hf`).
"""

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest_plugins = ["hf_fixtures"]


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


# The longest modules first (CPU seconds on 2 cores, measured in CI): xdist's --dist
# loadfile hands out whole modules in collection order, so a long one collected last
# would leave one worker idle at the end (longest-first packing).
LONGEST_FIRST = ("test_vision_audit", "test_paper_figures", "test_sharding", "test_step",
                 "test_tamper", "test_vision_inference", "test_client_hardening",
                 "test_audit_cli", "test_inference_audit", "test_serving", "test_doctor",
                 "test_serve_process", "test_platform", "test_attack_eval", "test_multihost",
                 "test_attack_success", "test_train", "test_generate", "test_hf_finetune")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: in-module order kept
  if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


# --- training configs ---------------------------------------------------------------------


def make_small_config(**overrides):
  """The "smoke" fine-tune run sheet (runs in seconds), then `overrides` applied.

  Keys of `overrides` are dotted paths into the config ("optim.learning_rate").
  A plain function for scripts the tests run in a subprocess; tests use the fixture.
  """
  from configs import finetune  # here, so that collecting the other tests never needs aftune

  c = finetune.get_config("smoke")
  for k, v in overrides.items():
    node, *path = k.split(".")
    target = c
    for p in [node, *path][:-1]:
      target = target[p]
    target[[node, *path][-1]] = v
  return c


@pytest.fixture(scope="session")
def small_config():
  """small_config(**overrides) -> a new tiny fine-tune config (see `make_small_config`)."""
  return make_small_config


# --- hashing reference (docs/hashing.md) --------------------------------------------------


def _ref_h(tag: bytes, body: bytes) -> bytes:
  import blake3

  return blake3.blake3(struct.pack("<Q", len(tag)) + tag + body).digest()


@pytest.fixture(scope="session")
def ref_h():
  """ref_h(tag, body) -> BLAKE3(u64le(len(tag)) || tag || body), written from docs/hashing.md."""
  return _ref_h


@pytest.fixture(scope="session")
def hashing_doc():
  """docs/hashing.md without whitespace, since the doc wraps long hex over lines."""
  return "".join((ROOT / "docs" / "hashing.md").read_text(encoding="utf-8").split())
