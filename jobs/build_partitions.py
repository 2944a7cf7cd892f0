"""Spark job: the training window's silver -> disjoint user shards, hold-out and DP vocabulary.

    spark-submit jobs/build_partitions.py --date 2026-01-15 [--lake URI]
        [--set window_days=7] [--set partitions=2] [--config-json '{...}']

Settings are those of privrec_pipeline/training/partitions.py (PartitionParams).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_settings_arguments, base_parser, parse_settings, resolve_lake, run
from privrec_pipeline.training.partitions import PartitionParams


def parse_args(argv: list[str] | None):
    parser = base_parser(__doc__.splitlines()[0])
    add_settings_arguments(parser, "training data setting")
    args = parser.parse_args(argv)
    args.params = parse_settings(parser, args, PartitionParams, "training data setting")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from privrec_pipeline.spark.session import get_spark
    from privrec_pipeline.training.partitions import run_build_partitions

    spark = get_spark(f"privrec-build-partitions-{args.date}", args.master)
    manifest = run_build_partitions(spark, resolve_lake(args.lake), args.date, args.params, run_id=args.run_id)
    # The task log is an output (Airflow keeps it): counts of users stay in the manifest, only the
    # vocabulary size (public catalog or DP selection) and the number of partitions are printed.
    print(json.dumps({"step": "build_partitions", "date": manifest.date, "days": manifest.days_used,
                      "vocabulary": manifest.vocabulary_size, "partitions": len(manifest.partitions),
                      "pseudonym_key_fingerprint": manifest.pseudonym_key_fingerprint}))
    return 0


if __name__ == "__main__":
    run(main)
