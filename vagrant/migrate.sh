#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# Migrate the lab guest's disk (README, "Lab"). Each step runs on the host it names:
#
#   migrate.sh [--root DIR] prepare NAME        on dst: make directory NAME in datastore ds1
#   migrate.sh [--root DIR] there NAME [OPT...] on src: migrate VM guest to dst:ds1/NAME
#   migrate.sh [--root DIR] back NAME [OPT...]  on src: migrate it back to a new local directory
#
# OPT... are more `svmotion migrate` options (e.g. --json, --stun-strategy legacy). The exit
# code is svmotion's (README, "Commands and exit codes"). vagrant/lab-migrate.sh runs the three
# steps through `vagrant ssh`, `svmotion lab migrate` through the namespace lab's hosts.
# --root DIR: the host's files are under DIR, as with provision.sh --root.
set -eu
ROLE=migrate
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

usage() {
  echo "usage: migrate.sh [--root DIR] prepare|there|back NAME [svmotion migrate options]" >&2
  exit 2
}

ROOT=""
if [ "${1:-}" = --root ]; then
  [ $# -ge 2 ] || usage
  ROOT=${2%/}
  shift 2
fi
[ $# -ge 2 ] || usage
step=$1 name=$2
shift 2
case $name in ''|*/*|.*) die "NAME $name: give a plain directory name, e.g. $(date +%Y%m%d-%H%M%S)" ;; esac

case $step in
  prepare)
    ROLE=dst
    mkdir -p "$ROOT/srv/svlab/ds1/$name"
    say "datastore directory $ROOT/srv/svlab/ds1/$name ready" >&2 ;;
  there|back)
    ROLE=src
    [ -r "$ROOT/etc/svlab/lab.env" ] || die "$ROOT/etc/svlab/lab.env missing: run this on src, after provision.sh src"
    # shellcheck source=/dev/null  # written by provision.sh src
    . "$ROOT/etc/svlab/lab.env"
    if [ "$step" = there ]; then
      dest=$DST_ADDR:$AGENT_PORT:$DST_DATASTORE/$name
    else
      dest=$BACK_DIR/$name
      mkdir -p "$dest"
    fi
    say "svmotion migrate guest --dest $dest $*" >&2
    exec "$SVMOTION" --agent-socket "$AGENT_SOCKET" migrate guest --dest "$dest" "$@" ;;
  *) usage ;;
esac
