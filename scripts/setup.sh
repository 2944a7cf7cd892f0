#!/usr/bin/env bash
# Creates .venv with pinned dependencies (constraints.txt). Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "privrec needs Python 3.11 (python3.11 not found). Install it, e.g. 'apt-get install python3.11 python3.11-venv' or pyenv, or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi

# Spark 4 needs Java 17 or newer.
if ! command -v java >/dev/null 2>&1; then
  echo "privrec needs Java 17+ for Spark, and 'java' is not on PATH." >&2
  echo "Install it, e.g. 'apt-get install openjdk-17-jre-headless' (Debian/Ubuntu) or 'brew install openjdk@17' (macOS), or set JAVA_HOME." >&2
  exit 1
fi
jv=$(java -version 2>&1 | sed -n 's/.*version "\([0-9][0-9]*\).*/\1/p' | head -1)
if [ -z "$jv" ] || [ "$jv" -lt 17 ]; then
  echo "privrec needs Java 17+ for Spark; found: $(java -version 2>&1 | head -1)." >&2
  echo "Install it, e.g. 'apt-get install openjdk-17-jre-headless', and put it first on PATH or set JAVA_HOME." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $PY"
  "$PY" -m venv .venv
fi
log=.venv/install.log
echo "Installing pinned dependencies (constraints.txt); the first run takes a few minutes (log: $log)"
if ! { .venv/bin/python -m pip install --quiet --upgrade "pip>=24" &&
       .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -40 >&2
  echo "Dependency installation failed; full log: $log" >&2
  exit 1
fi
# A UDF smoke check catches the pyspark/pyspark-client mismatch at install time.
.venv/bin/python - <<'PY'
import pyspark, importlib.metadata as md
client = md.version("pyspark-client")
if pyspark.__version__ != md.version("pyspark") or client != md.version("pyspark"):
    raise SystemExit(f"pyspark {md.version('pyspark')} and pyspark-client {client} differ; reinstall with constraints.txt")
PY
# The Data Docs' scripts, styles and fonts, served by the Airflow plugin instead of CDNs (exact
# versions and integrity hashes in package-lock.json). Needs npm (Node.js); under CI=true its
# absence is a failure, elsewhere the reports then load those files from the CDNs.
assets=privrec_pipeline/airflow_plugin/assets
if command -v npm >/dev/null 2>&1; then
  if [ ! -f "$assets/node_modules/.package-lock.json" ] || ! cmp -s "$assets/package-lock.json" "$assets/node_modules/.privrec-lock"; then
    echo "Installing the report assets (npm ci in $assets; log: $log)"
    if ! (cd "$assets" && npm ci --no-audit --no-fund) >>"$log" 2>&1; then
      tail -20 "$log" >&2; echo "npm ci failed in $assets; full log: $log" >&2; exit 1
    fi
    cp "$assets/package-lock.json" "$assets/node_modules/.privrec-lock"
  fi
else
  echo "npm not found: the Airflow plugin will serve Data Docs that load their scripts from CDNs (install Node.js and npm, then rerun make setup)." >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
fi
# Headless Chromium for the browser checks of the reports and the Airflow UI (Playwright
# drives the system browser; Playwright's own download needs a CDN). On a developer's
# machine best effort (without it those tests skip and say why); under CI=true a failure.
missing_chromium() {
  echo "$1" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
}
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Chromium for browser tests (apt-get install chromium; log: $log)"
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >>"$log" 2>&1 ||
      missing_chromium "Could not install Chromium (see $log); browser tests will be skipped (fail under CI)."
  else
    missing_chromium "Chromium not found: browser tests will be skipped (install the 'chromium' package to run them)."
  fi
fi
touch .venv/.installed
echo "Environment ready: .venv"
