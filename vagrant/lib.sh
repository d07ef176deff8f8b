# shellcheck shell=sh
# Helpers of the svmotion lab's scripts (POSIX sh, sourced by provision.sh and migrate.sh).
#
# Every change a script makes goes through put_file, put_tree or note_change, which print
# "svlab[ROLE]: changed: WHAT": a second run that prints no such line changed nothing (the
# idempotence test counts them, CHANGES holds the count).

CHANGES=0

say() { printf 'svlab[%s]: %s\n' "${ROLE:-?}" "$*"; }
die() { printf 'svlab[%s]: error: %s\n' "${ROLE:-?}" "$*" >&2; exit 1; }
note_change() { CHANGES=$((CHANGES + 1)); say "changed: $*"; }

# put_file MODE DEST: stdin becomes DEST (mode MODE) unless DEST already holds exactly that.
put_file() {
  mode=$1 dest=$2
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$dest.svlab.XXXXXX")
  cat > "$tmp"
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
    if [ "$(stat -c %a "$dest")" != "$mode" ]; then
      chmod "$mode" "$dest"
      note_change "$dest (mode $mode)"
    fi
    return 0
  fi
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
  note_change "$dest"
}

# put_tree SRC DEST: DEST becomes a copy of directory SRC (by content). Python writes __pycache__
# into DEST when it runs from there: left out, and directories' times are not kept (a new
# __pycache__ changes its directory's time, which is no change to the copy).
put_tree() {
  src=$1 dest=$2
  mkdir -p "$dest"
  out=$(rsync -a --omit-dir-times --no-owner --no-group --delete --checksum --itemize-changes --exclude __pycache__ "$src/" "$dest/") \
    || die "cannot copy $src to $dest"
  [ -z "$out" ] || note_change "$dest ($(printf '%s\n' "$out" | wc -l) entries)"
}

# ensure_dir MODE DIR
ensure_dir() {
  if [ ! -d "$2" ]; then
    mkdir -p "$2"
    chmod "$1" "$2"
    note_change "$2"
  elif [ "$(stat -c %a "$2")" != "$1" ]; then
    chmod "$1" "$2"
    note_change "$2 (mode $1)"
  fi
}

# ensure_packages PKG...: installs the Debian packages that are missing (nothing if none is).
ensure_packages() {
  missing=""
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed' \
      || missing="$missing $pkg"
  done
  [ -n "$missing" ] || return 0
  [ "$PACKAGES" = yes ] || die "Debian packages missing:$missing (run without --no-packages, or apt-get install them)"
  say "installing Debian packages:$missing"
  apt-get update -qq || die "apt-get update failed"
  # shellcheck disable=SC2086  # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
    || die "apt-get install$missing failed"
  note_change "packages$missing"
}
