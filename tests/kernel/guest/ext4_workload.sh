# Lab guest job: an ext4 workload on the svmotion disk (/dev/vda) until the host says "stop".
# Each round creates a file, rewrites a piece of an older one in place and now and then deletes
# one, each change followed by fsync; /tmp/sums holds what every live file must contain.
# At the end the page cache is dropped and every file is read back from the disk and checked.
mount -t ext4 /dev/vda /mnt || { echo "MOUNT-FAILED"; exit 10; }
mkdir -p /mnt/guest /tmp/sums
# A background job's stdin is /dev/null unless redirected: keep the console on fd 3 for it.
exec 3<&0
(while read -r line; do [ "$line" = stop ] && : > /tmp/stop; done) <&3 &
echo "WORKLOAD-STARTED"
i=0
while [ ! -e /tmp/stop ] || [ "$i" -lt 3 ]; do
  i=$((i + 1))
  dd if=/dev/urandom of=/mnt/guest/f$i bs=16k count=$(( i % 8 + 1 )) conv=fsync 2>/dev/null \
    || { echo "WRITE-ERROR f$i"; exit 11; }
  (cd /mnt && sha256sum guest/f$i > /tmp/sums/f$i)
  if [ "$i" -gt 4 ]; then
    j=$(( (i * 5) % (i - 1) + 1 ))
    if [ -e /tmp/sums/f$j ]; then
      dd if=/dev/urandom of=/mnt/guest/f$j bs=4k count=1 seek=$(( i % 3 )) conv=notrunc,fsync 2>/dev/null \
        || { echo "WRITE-ERROR f$j"; exit 11; }
      (cd /mnt && sha256sum guest/f$j > /tmp/sums/f$j)
    fi
  fi
  if [ $(( i % 10 )) -eq 0 ]; then
    rm -f /mnt/guest/f$(( i - 5 )) /tmp/sums/f$(( i - 5 )) && sync
  fi
  if [ "$i" -gt 60 ]; then      # bounded: at most ~60 live files (~4 MiB) on the 64 MiB disk
    rm -f /mnt/guest/f$(( i - 60 )) /tmp/sums/f$(( i - 60 ))
  fi
  [ "$i" -lt 3000 ] || { echo "NO-STOP: the host never said stop"; exit 15; }
  echo "ROUND $i"
  sleep 0.05
done
sync
echo 3 > /proc/sys/vm/drop_caches
cat /tmp/sums/* > /tmp/manifest
(cd /mnt && sha256sum -c /tmp/manifest > /tmp/verify 2>&1) || { echo "VERIFY-FAILED"; cat /tmp/verify; exit 12; }
echo "VERIFIED $(wc -l < /tmp/manifest) files"
sed 's/^/MANIFEST /' /tmp/manifest
echo "FILES $(ls /mnt/guest | wc -l)"
umount /mnt || { echo "UMOUNT-FAILED"; exit 14; }
if dmesg | grep -iE 'I/O error|EXT4-fs (error|warning)|buffer i/o|blk_update_request'; then
  echo "GUEST-IO-ERRORS"
  exit 13
fi
echo "WORKLOAD-OK"
