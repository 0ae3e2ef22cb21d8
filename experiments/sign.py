r"""Signs and verifies aftune's signed JSON documents (commitments, periodic roots).

  python -m experiments.sign verify W/commitment.json [--public-key HEX]
  python -m experiments.sign keygen provider_key.pem
  python -m experiments.sign sign doc.json provider_key.pem

Exit 0 on success, 1 on a signature that does not verify, 2 on unreadable input.
"""

import argparse
import json
import sys
from typing import Sequence

from aftune import jsonio
from aftune.crypto import signing


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ``verify FILE [--public-key HEX]``, ``keygen PATH``, ``sign FILE KEY``.

  Returns:
    0 on success, 1 on a signature failure, 2 on unreadable input.
  """
  parser = argparse.ArgumentParser(prog="python -m experiments.sign")
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("verify", help="verify a signed JSON document")
  p.add_argument("file")
  p.add_argument("--public-key", help="expected signer public key (hex)")
  p = sub.add_parser("keygen", help="write a new Ed25519 private key (PEM, 0600)")
  p.add_argument("path")
  p = sub.add_parser("sign", help="sign a JSON document in place")
  p.add_argument("file")
  p.add_argument("key", help="PEM private key")
  args = parser.parse_args(argv)

  if args.cmd == "keygen":
    try:
      pub = signing.generate_key(args.path)
    except OSError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(signing.public_key_hex(pub))
    return 0
  try:
    doc = jsonio.load_json(args.file)
    if args.cmd == "sign":
      signed = signing.sign_document(doc, signing.load_private_key(args.key))
      with open(args.file, "w", encoding="utf-8") as f:
        json.dump(signed, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
      print(f"signed {args.file} with {signed[signing.SIGNATURE_FIELD]['public_key']}")
      return 0
  except (OSError, ValueError, TypeError) as e:  # errors.InputError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    signing.verify_document(doc, args.public_key)
  except signing.SignatureError as e:
    print(f"FAIL {args.file}: {e}", file=sys.stderr)
    return 1
  print(f"OK {args.file} signed by {doc[signing.SIGNATURE_FIELD]['public_key']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
