r"""Client: draws the cells to audit after it holds the signed root; checks challenge files.

  python -m experiments.challenge --commitment W/commitment.json --strategy stratified \
      --out challenge.json
  python -m experiments.challenge --commitment W/commitment.json --strategy guarantee --k 2 --p 0.95
  python -m experiments.challenge draw --job-id HEX --root HEX --layer-blocks L --step-blocks S \
      --strategy uniform --m 6 --out challenge.json
  python -m experiments.challenge show challenge.json
  python -m experiments.challenge verify challenge.json [--nonce-commitment HEX]

`draw` is the default command. It takes the job id, the root and the grid from the provider's
signed commitment (whose signature it checks first; --public_key pins the key), or from
--job-id, --root, --layer-blocks and --step-blocks. The cells derive from H(root || nonce); the
nonce is fresh unless --nonce is given, and is written into the challenge so that anyone can
re-derive the draw, which is what `verify` does. `show` checks a challenge file and prints it.

Exit status: 0 OK; 1 `verify` found cells that do not follow from (root, nonce), or a nonce that
does not match its commitment; 2 bad arguments, a bad signature, an unreadable or invalid file.
"""

import argparse
import sys
from collections.abc import Sequence

from aftune import errors
from aftune.audit import challenge as challenge_lib
from aftune.audit import challenge_checks
from aftune.audit import challenge_doc
from aftune.audit import challenge_params
from aftune.crypto import hashing

_COMMANDS = ("draw", "show", "verify", "-h", "--help")


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m experiments.challenge",
                               description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("draw", help="draw a challenge and write it as JSON (the default command)")
  d.add_argument("--commitment", help="the provider's signed commitment.json: job id, root, grid")
  d.add_argument("--public_key", "--public-key", help="expected provider key (hex)")
  d.add_argument("--job-id", help="32-byte hex (instead of --commitment)")
  d.add_argument("--root", help="32-byte hex Merkle root (instead of --commitment)")
  d.add_argument("--layer-blocks", type=int, help="grid rows L (instead of --commitment)")
  d.add_argument("--step-blocks", type=int, help="grid columns S (instead of --commitment)")
  d.add_argument("--strategy", choices=challenge_params.STRATEGIES, default="stratified")
  d.add_argument("--m", type=int, help="number of cells")
  d.add_argument("--k", type=int, help="guarantee: at least k tampered cells ...")
  d.add_argument("--p", type=float, help="... are caught with probability >= p")
  d.add_argument("--nonce", help="client nonce (hex); default: 32 fresh random bytes")
  d.add_argument("--out", default="challenge.json", help="where to write the challenge")
  d.add_argument("--receipt", help="a served request's receipt (experiments.serve): draw --m "
                 "(block, step) cells of that request only")
  d.add_argument("--seed", type=int, help="with --receipt: the draw's seed (default: fresh)")
  s = sub.add_parser("show", help="check and print a challenge")
  s.add_argument("file")
  v = sub.add_parser("verify", help="re-derive a challenge's cells from (root, nonce)")
  v.add_argument("file")
  v.add_argument("--nonce-commitment", help="hex commitment published before the root")
  return ap


def _draw(args: argparse.Namespace) -> challenge_doc.Challenge:
  nonce = None if args.nonce is None else hashing.from_hex(args.nonce, None)
  grid = (args.job_id, args.root, args.layer_blocks, args.step_blocks)
  if args.commitment is not None:
    if any(x is not None for x in grid):
      raise ValueError("give --commitment, or --job-id, --root, --layer-blocks, --step-blocks")
    # Imported here: it imports JAX, which show, verify and --job-id draws do not need.
    from aftune.audit import client  # pylint: disable=g-import-not-at-top
    commitment = client.load_commitment(args.commitment, args.public_key)
    return client.draw(commitment, args.strategy, m=args.m, k=args.k, p=args.p, nonce=nonce)
  if any(x is None for x in grid):
    raise ValueError("draw needs --commitment, or --job-id, --root, --layer-blocks and "
                     "--step-blocks")
  if args.public_key is not None:
    raise ValueError("--public_key checks the signature of --commitment; none was given")
  return challenge_lib.draw_challenge(
      job_id=hashing.from_hex(args.job_id), root=hashing.from_hex(args.root),
      num_layer_blocks=args.layer_blocks, num_step_blocks=args.step_blocks,
      strategy=args.strategy, m=args.m, k=args.k, p=args.p, nonce=nonce)


def _draw_request(args: argparse.Namespace) -> int:
  """A challenge of one served request's own cells, from its receipt (checked first)."""
  if args.commitment or args.m is None or args.m < 1:
    raise ValueError("--receipt draws --m >= 1 cells of that request (no --commitment)")
  from aftune import jsonio  # pylint: disable=g-import-not-at-top
  from aftune.audit import request_verifier  # pylint: disable=g-import-not-at-top
  from aftune.infer import receipts  # pylint: disable=g-import-not-at-top
  receipt, _ = receipts.load_receipt(args.receipt, public_key=args.public_key)
  ch = request_verifier.draw_cells(receipt, args.m, seed=args.seed)
  jsonio.write_json(args.out, ch.to_json())
  print(f"{len(ch.cells)} cells of request {ch.request_id} -> {args.out}: {list(ch.cells)}")
  return 0


def _verify(args: argparse.Namespace) -> int:
  ch = challenge_doc.load_challenge(args.file)
  commit = None if args.nonce_commitment is None else hashing.from_hex(args.nonce_commitment)
  try:
    challenge_lib.verify_challenge_derivation(ch, expected_nonce_commitment=commit)
  except challenge_checks.ChallengeError as e:
    print(f"error: {args.file}: {e}", file=sys.stderr)
    return 1
  print(f"{args.file}: OK, {len(ch.cells)} cells follow from (root, nonce)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (see the module doc)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in _COMMANDS:
    argv.insert(0, "draw")
  args = _parser().parse_args(argv)
  try:
    if args.cmd == "verify":
      return _verify(args)
    if args.cmd == "draw" and args.receipt:
      return _draw_request(args)
    if args.cmd == "draw":
      ch = _draw(args)
      challenge_doc.save_challenge(ch, args.out)
      print(f"{len(ch.cells)} cells -> {args.out}: {list(ch.cells)}")
    else:
      ch = challenge_doc.load_challenge(args.file)
      print(f"{args.file}: {ch.strategy}, {len(ch.cells)} cells of a "
            f"{ch.num_layer_blocks}x{ch.num_step_blocks} grid")
      print("cells:", " ".join(f"({a},{b})" for a, b in ch.cells))
    print(ch.guarantee_text)
  except (ValueError, OSError, errors.InputError) as e:  # ChallengeError, bad hex, a bad
    # signature, file errors, a receipt that does not verify
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
