"""Spark job: pseudonymize one day of bronze into silver (+ manifest).

    spark-submit jobs/pseudonymize.py --date 2026-01-15 [--lake URI]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, resolve_lake, run
from privrec_pipeline.ingest import run_pseudonymize
from privrec_pipeline.secrets import load_keyring
from privrec_pipeline.spark.session import get_spark


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    keys = load_keyring()
    spark = get_spark(f"privrec-pseudonymize-{args.date}", args.master)
    manifest = run_pseudonymize(spark, resolve_lake(args.lake), args.date, keys, run_id=args.run_id)
    print(json.dumps({"step": "pseudonymize", "date": manifest.date,
                      "silver": manifest.silver_records, "pseudonym_key_version": manifest.pseudonym_key_version,
                      "pseudonym_key_fingerprint": manifest.pseudonym_key_fingerprint}))
    return 0


if __name__ == "__main__":
    run(main)
