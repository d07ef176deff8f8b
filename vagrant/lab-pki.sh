#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# The Vagrant lab's certificates, made on the host that runs `vagrant up` (a trigger in the
# Vagrantfile): one CA and a certificate for src and dst, by `svmotion tls init`, in .lab/tls of
# the project folder, which rsync then copies to the machines (provision.sh installs each
# host's own). Idempotent: only a missing host's certificate is made; the CA is kept.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(dirname "$HERE")
# shellcheck source=lab.env
. "$HERE/lab.env"
python=python3
[ ! -x "$PROJECT/.venv/bin/python" ] || python=$PROJECT/.venv/bin/python
for role in src dst; do
  if [ "$role" = src ]; then addr=$SRC_ADDR; else addr=$DST_ADDR; fi
  [ -f "$PROJECT/.lab/tls/$role/client-key.pem" ] && continue
  PYTHONPATH=$PROJECT "$python" -m agent.cli tls init "$PROJECT/.lab/tls" --host "$role,$addr" \
    || { echo "lab-pki.sh: cannot run svmotion tls init here: install python3-click and python3-cryptography, or run make setup" >&2; exit 1; }
done
