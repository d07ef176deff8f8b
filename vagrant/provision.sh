#!/bin/sh
# shellcheck source-path=SCRIPTDIR
# Provision one host of the svmotion lab (README, "Lab"): src, dst or mon.
#
#   provision.sh ROLE [--root DIR] [--shared DIR] [--no-systemd] [--no-packages] [--no-grafana]
#
# src: the agent serving VM "guest" (one ext4 disk) and the QEMU guest that writes and verifies
#      files on that disk; dst: an agent offering datastore ds1 to other hosts (mutual TLS);
#      mon: Prometheus scraping both agents with the project's alert rules, and Grafana with the
#      project's provisioning and dashboard.
# Every host: the Debian packages it needs, svmotion installed under /opt/svmotion (the project's
# code from the synced folder, run by Debian's python3), its certificate from `svmotion tls init`
# (one CA for the lab, kept in the shared directory), its config and systemd units.
#
# Options (the namespace lab, svlab/nslab.py, runs this very script for each of its hosts):
#   --root DIR     every path this script writes is under DIR (default: /, a real machine)
#   --shared DIR   a directory all hosts see, for the lab's CA (default: /vagrant/.lab)
#   --no-systemd   write the units but do not enable or start them (the namespace lab's
#                  supervisor runs their ExecStart= lines)
#   --no-packages  fail instead of installing a missing Debian package
#   --no-grafana   mon without Grafana (no Grafana package on the CI machine)
#   --packages-only  install the Debian packages of ROLE and stop (to prepare a machine image)
# Idempotent: a second run changes nothing and says so (no "changed:" line; see lib.sh).
# Settings (addresses, ports, paths): lab.env, overridable from the environment.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PROJECT=$(dirname "$HERE")
# shellcheck source=lab.env
. "$HERE/lab.env"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

usage() {
  echo "usage: provision.sh src|dst|mon [--root DIR] [--shared DIR] [--no-systemd] [--no-packages] [--no-grafana] [--packages-only]" >&2
  exit 2
}

ROLE=${1:-}
case $ROLE in src|dst|mon) shift ;; *) usage ;; esac
ROOT="" SHARED=/vagrant/.lab SYSTEMD=yes PACKAGES=yes GRAFANA=yes PACKAGES_ONLY=no
while [ $# -gt 0 ]; do
  case $1 in
    --root) [ $# -ge 2 ] || usage; ROOT=${2%/}; shift 2 ;;
    --shared) [ $# -ge 2 ] || usage; SHARED=$2; shift 2 ;;
    --no-systemd) SYSTEMD=no; shift ;;
    --no-packages) PACKAGES=no; shift ;;
    --no-grafana) GRAFANA=no; shift ;;
    --packages-only) PACKAGES_ONLY=yes; shift ;;
    *) usage ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (packages, /etc, systemd)"

SVMOTION=$ROOT/usr/local/bin/svmotion
UNITS=$ROOT/etc/systemd/system
case $ROLE in src) ADDR=$SRC_ADDR ;; dst) ADDR=$DST_ADDR ;; mon) ADDR=$MON_ADDR ;; esac

# ---- Debian packages -------------------------------------------------------------------------
packages() {
  ensure_packages python3 python3-click python3-prometheus-client python3-pyroute2 \
    python3-cryptography rsync iproute2 util-linux ca-certificates
  case $ROLE in
    src) ensure_packages nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd \
           qemu-system-x86 qemu-utils e2fsprogs kmod ;;
    dst) ensure_packages nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd ;;
    mon) ensure_packages prometheus curl ;;
  esac
}

# ---- svmotion: the project's code and a launcher ---------------------------------------------
install_svmotion() {
  for pkg in agent nbd_plugin svlab; do
    put_tree "$PROJECT/$pkg" "$ROOT/opt/svmotion/$pkg"
  done
  put_file 755 "$SVMOTION" <<LAUNCHER
#!/bin/sh
# svmotion as the lab installs it (vagrant/provision.sh): the project's code, Debian's python3.
PYTHONPATH=$ROOT/opt/svmotion exec /usr/bin/python3 -m agent.cli "\$@"
LAUNCHER
}

# ---- TLS: one CA for the lab (in the shared directory), this host's certificate -------------
certificates() {
  tls=$SHARED/tls
  if [ ! -f "$tls/$ROLE/client-key.pem" ]; then
    mkdir -p "$tls"
    # flock: machines provisioned at the same time make one CA, not two.
    flock "$SHARED/tls.lock" "$SVMOTION" tls init "$tls" --host "$ROLE,$ADDR" >/dev/null \
      || die "svmotion tls init failed"
    note_change "$tls/$ROLE (certificate for $ROLE,$ADDR)"
  fi
  put_tree "$tls/$ROLE" "$ROOT/etc/svmotion/tls"
}

# ---- systemd units ---------------------------------------------------------------------------
# activate UNIT CHANGES_BEFORE: enable and (re)start UNIT when its inputs changed or it is stopped.
activate() {
  unit=$1 before=$2
  if [ "$SYSTEMD" = no ]; then
    return 0
  fi
  if [ "$CHANGES" != "$before" ]; then
    systemctl daemon-reload
    systemctl enable -q "$unit"
    systemctl restart "$unit"
    say "restarted $unit"
  elif ! systemctl is-active -q "$unit"; then
    systemctl enable -q "$unit"
    systemctl start "$unit"
    note_change "$unit started"
  fi
}

agent_unit() {
  put_file 644 "$UNITS/svmotion-agent.service" <<UNIT
# svmotion agent of the lab's $ROLE host (vagrant/provision.sh)
[Unit]
Description=svmotion agent (lab host $ROLE)
# Retry for ever: at boot the lab address it listens on may come a little later.
StartLimitIntervalSec=0
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$SVMOTION agent --config $ROOT/etc/svmotion/agent.toml
Restart=on-failure
RestartSec=1
# The agent starts nbdkit detached: the VM keeps its disks while the agent restarts, and the
# agent adopts that nbdkit when it comes back.
KillMode=process

[Install]
WantedBy=multi-user.target
UNIT
}

# ---- src: the agent serving the guest's disk, and the guest ----------------------------------
src_host() {
  ensure_dir 700 "$ROOT/var/lib/svmotion"
  ensure_dir 700 "$ROOT/var/lib/svlab/guest"
  disk=$ROOT/var/lib/svlab/guest/disk0.raw
  if [ ! -e "$disk" ]; then
    truncate -s "${GUEST_DISK_MIB}M" "$disk.new"
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 -L svlab "$disk.new"
    mv "$disk.new" "$disk"
    note_change "$disk (ext4, $GUEST_DISK_MIB MiB)"
  fi
  before=$CHANGES
  put_file 644 "$ROOT/etc/svmotion/agent.toml" <<CONFIG
# svmotion agent of the lab's src host (vagrant/provision.sh): serves VM "guest".
[agent]
socket = "$ROOT/run/svmotion/agent.sock"
state_dir = "$ROOT/var/lib/svmotion"
metrics = "$SRC_ADDR:$METRICS_PORT"

[tls]
dir = "$ROOT/etc/svmotion/tls"

[[vm]]
name = "guest"
socket = "$ROOT/run/svmotion/guest.nbd"

  [[vm.disk]]
  name = "disk0"
  path = "$disk"
CONFIG
  agent_unit
  activate svmotion-agent.service "$before"

  put_file 644 "$ROOT/etc/svlab/lab.env" <<ENV
# The lab as src's scripts see it (vagrant/migrate.sh), written by vagrant/provision.sh.
SVMOTION=$SVMOTION
AGENT_SOCKET=$ROOT/run/svmotion/agent.sock
BACK_DIR=$ROOT/var/lib/svlab/guest
DST_ADDR=$DST_ADDR
AGENT_PORT=$AGENT_PORT
DST_DATASTORE=$DST_DATASTORE
ENV

  # The guest's kernel and initrd, built from Debian packages once (svlab/lab.py).
  ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || [ "$PACKAGES" = no ] || apt-get update -qq
  built=$(PYTHONPATH=$ROOT/opt/svmotion /usr/bin/python3 -m svlab.guest prepare --cache "$GUEST_CACHE") \
    || die "cannot build the guest's images"
  [ -z "$built" ] || note_change "$built"

  before=$CHANGES
  ensure_dir 700 "$ROOT/var/lib/svlab/guest-run"
  put_file 644 "$UNITS/svmotion-guest.service" <<UNIT
# The lab's guest on src (vagrant/provision.sh): QEMU (TCG) on the svmotion disk, writing files
# and verifying them; stopping it makes the guest verify everything once more and power off.
# Wants=, not Requires=: the agent may restart without the guest (its nbdkit keeps serving).
[Unit]
Description=svlab guest on svmotion VM guest
StartLimitIntervalSec=0
Wants=svmotion-agent.service
After=svmotion-agent.service

[Service]
Environment=PYTHONPATH=$ROOT/opt/svmotion
ExecStart=/usr/bin/python3 -m svlab.guest run --socket $ROOT/run/svmotion/guest.nbd --export disk0 --workdir $ROOT/var/lib/svlab/guest-run --cache $GUEST_CACHE
Restart=on-failure
RestartSec=2
KillMode=mixed
TimeoutStopSec=120

[Install]
WantedBy=multi-user.target
UNIT
  activate svmotion-guest.service "$before"
}

# ---- dst: an agent offering datastore ds1 ----------------------------------------------------
dst_host() {
  ensure_dir 700 "$ROOT/var/lib/svmotion"
  ensure_dir 755 "$ROOT/srv/svlab/ds1"
  before=$CHANGES
  put_file 644 "$ROOT/etc/svmotion/agent.toml" <<CONFIG
# svmotion agent of the lab's dst host (vagrant/provision.sh): offers datastore ds1.
[agent]
socket = "$ROOT/run/svmotion/agent.sock"
state_dir = "$ROOT/var/lib/svmotion"
metrics = "$DST_ADDR:$METRICS_PORT"
listen = "$DST_ADDR:$AGENT_PORT"
nbd_listen = "$DST_ADDR:$NBD_PORT"

[tls]
dir = "$ROOT/etc/svmotion/tls"

[[datastore]]
name = "ds1"
path = "$ROOT/srv/svlab/ds1"
CONFIG
  agent_unit
  activate svmotion-agent.service "$before"
}

# ---- mon: Prometheus (and Grafana) -----------------------------------------------------------
mon_host() {
  ensure_dir 755 "$ROOT/var/lib/svlab/prometheus"
  before=$CHANGES
  put_file 644 "$ROOT/etc/svlab/prometheus/svmotion.rules.yml" < "$PROJECT/grafana/svmotion.rules.yml"
  put_file 644 "$ROOT/etc/svlab/prometheus/prometheus.yml" <<CONFIG
# Prometheus of the svmotion lab on mon (vagrant/provision.sh): both agents, the project's rules.
global:
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s

rule_files:
  - svmotion.rules.yml

scrape_configs:
  - job_name: svmotion
    static_configs:
      - targets: ["$SRC_ADDR:$METRICS_PORT"]
        labels: {host: src}
      - targets: ["$DST_ADDR:$METRICS_PORT"]
        labels: {host: dst}
CONFIG
  put_file 644 "$UNITS/svmotion-prometheus.service" <<UNIT
# Prometheus of the svmotion lab on mon (vagrant/provision.sh).
[Unit]
Description=Prometheus of the svmotion lab
StartLimitIntervalSec=0
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/prometheus --config.file=$ROOT/etc/svlab/prometheus/prometheus.yml --storage.tsdb.path=$ROOT/var/lib/svlab/prometheus --web.listen-address=0.0.0.0:$PROMETHEUS_PORT --log.level=warn
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
UNIT
  if [ "$SYSTEMD" = yes ] && systemctl is-enabled -q prometheus.service 2>/dev/null; then
    systemctl disable -q --now prometheus.service    # Debian's own, on the same port
    note_change "Debian's prometheus.service disabled"
  fi
  activate svmotion-prometheus.service "$before"
  [ "$GRAFANA" = no ] || grafana
}

# Grafana from its own Debian repository, with the project's datasource, provider and dashboard;
# then Grafana is asked for the dashboard, so a dashboard it cannot load fails the provisioning.
grafana() {
  ensure_packages gpg
  key=/etc/apt/keyrings/grafana.gpg
  if [ ! -s "$key" ]; then
    mkdir -p /etc/apt/keyrings
    curl -fsSL -o "$key.asc" https://apt.grafana.com/gpg.key || die "cannot fetch Grafana's key"
    gpg --dearmor < "$key.asc" > "$key.new" || die "Grafana's key is not an OpenPGP key"
    rm -f "$key.asc"
    mv "$key.new" "$key"
    note_change "$key"
  fi
  before=$CHANGES
  echo "deb [signed-by=$key] https://apt.grafana.com stable main" \
    | put_file 644 /etc/apt/sources.list.d/grafana.list
  [ "$CHANGES" = "$before" ] || apt-get update -qq
  ensure_packages grafana
  before=$CHANGES
  put_file 644 /etc/grafana/provisioning/datasources/svmotion.yml < "$PROJECT/grafana/provisioning/datasources/svmotion.yml"
  put_file 644 /etc/grafana/provisioning/dashboards/svmotion.yml < "$PROJECT/grafana/provisioning/dashboards/svmotion.yml"
  # The dashboard goes where the project's provider (just installed) tells Grafana to look.
  dashboards=$(sed -n 's/^ *path: *//p' "$PROJECT/grafana/provisioning/dashboards/svmotion.yml")
  [ -n "$dashboards" ] || die "grafana/provisioning/dashboards/svmotion.yml names no path:"
  put_file 644 "$dashboards/svmotion.json" < "$PROJECT/grafana/dashboards/svmotion.json"
  activate grafana-server.service "$before"
  uid=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["uid"])' < "$PROJECT/grafana/dashboards/svmotion.json")
  tries=0
  until curl -fsS -u admin:admin "http://127.0.0.1:3000/api/dashboards/uid/$uid" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || die "Grafana did not load dashboard $uid (journalctl -u grafana-server)"
    sleep 1
  done
  curl -fsS -u admin:admin "http://127.0.0.1:3000/api/datasources/uid/svmotion-prometheus/health" >/dev/null \
    || die "Grafana's datasource svmotion-prometheus cannot query Prometheus"
  say "Grafana serves dashboard $uid: http://$MON_ADDR:3000/d/$uid (admin/admin)"
}

say "provisioning ${ROOT:-/} (address $ADDR)"
packages
if [ "$PACKAGES_ONLY" = yes ]; then
  say "done (packages only), $CHANGES change(s)"
  exit 0
fi
install_svmotion
case $ROLE in
  src) certificates; src_host ;;
  dst) certificates; dst_host ;;
  mon) mon_host ;;
esac
say "done, $CHANGES change(s)"
