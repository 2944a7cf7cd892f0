"""Spark job: collect one day of landing logs into bronze + quarantine (+ manifest).

    spark-submit jobs/collect.py --date 2026-01-15 [--lake URI] [--allow-empty [true|false]]
        [--unknown-items quarantine|keep] [--data-keys per-user|none]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, parse_bool, resolve_lake, run
from privrec_pipeline.ingest import UNKNOWN_ITEMS, run_collect
from privrec_pipeline.secrets import load_keyring
from privrec_pipeline.spark.session import get_spark


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--allow-empty", nargs="?", const="true", default="false", type=parse_bool,
                        help="accept a missing or empty landing partition (a day without traffic)")
    parser.add_argument("--unknown-items", choices=UNKNOWN_ITEMS, default="quarantine",
                        help="records of items outside the day's catalog: quarantine them (reason unknown_item) or "
                             "keep them (validate counts them; the DP statistics leave them out)")
    parser.add_argument("--data-keys", choices=("per-user", "none"), default="per-user",
                        help="seal each user's identifiers and quarantined lines under their own data key "
                             "(crypto-shredding; the default), or keep them under the encryption key alone "
                             "(the benchmark's baseline)")
    args = parser.parse_args(argv)
    keys = load_keyring()
    spark = get_spark(f"privrec-collect-{args.date}", args.master)
    manifest = run_collect(spark, resolve_lake(args.lake), args.date, keys,
                           run_id=args.run_id, allow_empty=args.allow_empty, unknown_items=args.unknown_items,
                           per_user_keys=args.data_keys == "per-user")
    print(json.dumps({"step": "collect", "date": manifest.date, "landing": manifest.landing_records,
                      "bronze": manifest.bronze_records, "quarantined": manifest.quarantined_total,
                      "duplicates": manifest.duplicates, "encryption_key_version": manifest.encryption_key_version,
                      "encryption_key_fingerprint": manifest.encryption_key_fingerprint}))
    return 0


if __name__ == "__main__":
    run(main)
