r"""Client: draws the cells to audit from the signed commitment, after it holds the root.

  python -m experiments.challenge --commitment W/commitment.json --strategy stratified \
      --out challenge.json
  python -m experiments.challenge --commitment W/commitment.json --strategy guarantee --k 2 --p 0.95

The cells derive from H(root || nonce); the nonce is fresh unless --nonce is given, and
is written into the challenge so that anyone can re-derive the draw.
"""

import sys

from absl import app
from absl import flags

from aftune import audit
from aftune import challenge as challenge_lib

_COMMITMENT = flags.DEFINE_string("commitment", None, "The provider's commitment.json.", required=True)
_STRATEGY = flags.DEFINE_enum("strategy", "stratified",
                              ["uniform", "input_only", "output_only", "stratified", "guarantee"],
                              "How to draw cells.")
_M = flags.DEFINE_integer("m", None, "Number of cells.")
_K = flags.DEFINE_integer("k", None, "Guarantee: at least k tampered cells ...")
_P = flags.DEFINE_float("p", None, "... are caught with probability >= p.")
_NONCE = flags.DEFINE_string("nonce", None, "Client nonce (hex); default: fresh randomness.")
_PUBLIC_KEY = flags.DEFINE_string("public_key", None, "Expected provider key (hex).")
_OUT = flags.DEFINE_string("out", "challenge.json", "Where to write the challenge.")


def main(argv):
  del argv
  try:
    commitment = audit.load_commitment(_COMMITMENT.value, _PUBLIC_KEY.value)
    nonce = bytes.fromhex(_NONCE.value) if _NONCE.value else None
    ch = audit.draw(commitment, _STRATEGY.value, m=_M.value, k=_K.value, p=_P.value, nonce=nonce)
    challenge_lib.save_challenge(ch, _OUT.value)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{len(ch.cells)} cells -> {_OUT.value}: {list(ch.cells)}")
  print(ch.guarantee_text)


if __name__ == "__main__":
  app.run(main)
