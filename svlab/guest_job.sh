#!/bin/sh
# The lab guest's job (busybox sh, run by svlab/guest.py): files written on the svmotion disk
# (/dev/vda, ext4) and verified by the guest itself, round after round, until the host says "stop".
# Each round writes a file with fsync and records its SHA-256; old files are deleted (at most
# KEEP live). Every VERIFY_EVERY rounds the page cache is dropped and every live file is read
# back from the disk and checked, and the kernel log is searched for IO errors. After "stop":
# one more check, unmount, power off. Lines the host reads: WORKLOAD-STARTED, ROUND N,
# VERIFIED N FILES, and at the end WORKLOAD-OK; failures: MOUNT-FAILED, WRITE-ERROR,
# VERIFY-FAILED, GUEST-IO-ERRORS, UMOUNT-FAILED (each with its own exit code).
KEEP=40
VERIFY_EVERY=5
PAUSE=0.2
mount -t ext4 /dev/vda /mnt || { echo "MOUNT-FAILED"; exit 10; }
rm -rf /mnt/svlab            # the checksums of an earlier boot are gone with its /tmp
mkdir -p /mnt/svlab /tmp/sums
# A background job's stdin is /dev/null unless redirected: keep the console on fd 3 for it.
exec 3<&0
(while read -r line; do [ "$line" = stop ] && : > /tmp/stop; done) <&3 &

verify() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  cat /tmp/sums/* > /tmp/manifest
  (cd /mnt && sha256sum -c /tmp/manifest > /tmp/verify 2>&1) || { echo "VERIFY-FAILED $i"; cat /tmp/verify; exit 12; }
  if dmesg | grep -iE 'I/O error|EXT4-fs (error|warning)|buffer i/o|blk_update_request'; then
    echo "GUEST-IO-ERRORS"
    exit 13
  fi
  echo "VERIFIED $i $(wc -l < /tmp/manifest)"
}

echo "WORKLOAD-STARTED"
i=0
while [ ! -e /tmp/stop ]; do
  i=$((i + 1))
  dd if=/dev/urandom of=/mnt/svlab/f$i bs=16k count=$(( i % 8 + 1 )) conv=fsync 2>/dev/null \
    || { echo "WRITE-ERROR f$i"; exit 11; }
  (cd /mnt && sha256sum svlab/f$i > /tmp/sums/f$i)
  if [ "$i" -gt "$KEEP" ]; then
    rm -f /mnt/svlab/f$(( i - KEEP )) /tmp/sums/f$(( i - KEEP ))
  fi
  [ $(( i % VERIFY_EVERY )) -ne 0 ] || verify
  echo "ROUND $i"
  sleep "$PAUSE"
done
verify
umount /mnt || { echo "UMOUNT-FAILED"; exit 14; }
echo "WORKLOAD-OK"
